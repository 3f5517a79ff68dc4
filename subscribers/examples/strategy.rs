//! A co-located strategy: BTCUSDT 1m closes → a 5-bar moving-average signal, zero-copy.
//! Run `mdbus demo` (bus "demo") first, then: cargo run --example strategy -- demo
use std::time::Duration;

use mdbus_subscribers::{Health, Interval, Reader, ReaderOptions, WaitMode};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = std::env::args().nth(1).unwrap_or_else(|| "demo".into());
    let opts = ReaderOptions::default().symbol("BTCUSDT")?.interval(Interval::M1);
    let mut reader = Reader::open(&bus, "realtime", opts)?;
    let mut closes: Vec<f64> = Vec::new();
    let mut health = Health::Unknown;
    loop {
        // Sleeps on the stream's wake-up event; WaitMode::Spin busy-polls for lowest latency.
        reader.next_batch(WaitMode::Block(Duration::from_millis(200)), |frame| {
            let Ok(k) = frame.kline() else { return }; // validated in place, no copy
            let scale = 10f64.powi(i32::from(k.price_scale));
            let close = k.close.to_native() as f64 / scale;
            if !k.closed {
                return;
            }
            closes.push(close);
            let n = closes.len().min(5);
            let ma = closes[closes.len() - n..].iter().sum::<f64>() / n as f64;
            let signal = if close > ma { "above" } else { "below" };
            println!("seq {} {} close {close:.2} ma5 {ma:.2} {signal}", frame.seq(), k.open_time.to_native());
        })?;
        let s = reader.stats();
        if reader.health() != health || s.seq.gaps > 0 {
            health = reader.health();
            eprintln!("publisher {} gaps {} missing {}", health.as_str(), s.seq.gaps, s.seq.missing);
        }
    }
}
