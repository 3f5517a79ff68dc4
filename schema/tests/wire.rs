//! Wire-format tests: golden bytes pin the layout; garbage never panics.

#![allow(clippy::unwrap_used)]

use mdbus_schema::frame::{encoded_frame_len, header};
use mdbus_schema::json::write_frame_line;
use mdbus_schema::{
    FeedState, FrameDecodeError, FrameHeader, FrameIter, FrameKind, FrameWriter, Heartbeat, Interval, Kline, Symbol,
    Trade, FRAME_HEADER_LEN, SCHEMA_VERSION,
};
use proptest::prelude::*;

fn trade() -> Trade {
    Trade {
        symbol: Symbol::new("BTCUSDT").unwrap(),
        symbol_id: 3,
        price_scale: 2,
        qty_scale: 5,
        is_buyer_maker: true,
        trade_id: 4_242_424_242,
        price: 8_723_201,
        qty: 1_250,
        time_us: 1_709_251_199_999_123,
    }
}

fn kline() -> Kline {
    let t = trade();
    let mut k = Kline::open_with(Interval::M1, Interval::M1.open_time(t.time_ms()), &t);
    k.add(&Trade { trade_id: t.trade_id + 1, price: 8_723_500, qty: 7, is_buyer_maker: false, ..t });
    k.closed = true;
    k
}

fn heartbeat() -> Heartbeat {
    Heartbeat {
        publisher_id: 0x0123_4567_89ab_cdef,
        last_seq: 99,
        interval_ms: 100,
        feed_state: FeedState::Live as u8,
        started_at_ns: 1_700_000_000_000_000_000,
    }
}

fn hdr(kind: FrameKind, seq: u64) -> FrameHeader {
    FrameHeader {
        ts_event_ns: 1_709_251_199_999_123_000,
        ts_recv_ns: 1_709_251_200_000_000_000,
        ts_publish_ns: 1_709_251_200_000_500_000,
        ..header(kind, 1, seq)
    }
}

fn encoded() -> FrameWriter {
    let mut w = FrameWriter::with_capacity(1024);
    w.push_trade(hdr(FrameKind::Trade, 7), &trade()).unwrap();
    w.push_kline(hdr(FrameKind::Kline, 8), &kline()).unwrap();
    w.push_heartbeat(hdr(FrameKind::Heartbeat, 8), &heartbeat()).unwrap();
    w
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// Golden bytes of `encoded()`. A layout change makes this fail: bump SCHEMA_VERSION (and the
// service names with it), then update the constant.
const GOLDEN: &str = concat!(
    "4d4442460100010040000000010000000700000000000000389edb0fe97ab8170000e90fe97ab81720a1f00fe97ab817",
    "4254435553445400000000000000000000000000000000000300000002050100b241defc00000000011b850000000000e204000000000000939c9b0e8e1206004d44424601000200b0000000010000000800000000000000389edb0fe97ab8170000e90fe97ab81720a1f00fe97ab81742544355534454000000000000000000000000000000000003000000010205010000000000000000a0994ef78d010000ff834ff78d010000b241defc00000000b341defc000000000200000000000000011b8500000000002c1c850000000000011b8500000000002c1c850000000000e904000000000000000000000000000016a0918d0200000000000000000000000700000000000000000000000000000034c5a3030000000000000000000000004d4442460100030020000000010000000800000000000000389edb0fe97ab8170000e90fe97ab81720a1f00fe97ab817efcdab89674523016300000000000000640000000100000000002a36fe9c9717"
);

#[test]
fn golden_bytes_pin_the_wire_layout() {
    assert_eq!(SCHEMA_VERSION, 1, "layout changed: update GOLDEN together with the version");
    let got = hex(encoded().as_bytes());
    assert_eq!(got, GOLDEN);
}

#[test]
fn frames_round_trip_through_the_iterator() {
    let w = encoded();
    assert_eq!(w.frames(), 3);
    assert_eq!(
        w.len(),
        encoded_frame_len(FrameKind::Trade)
            + encoded_frame_len(FrameKind::Kline)
            + encoded_frame_len(FrameKind::Heartbeat)
    );
    let frames: Vec<_> = FrameIter::new(w.as_bytes()).collect::<Result<_, _>>().unwrap();
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0].header, FrameHeader { body_len: frames[0].header.body_len, ..hdr(FrameKind::Trade, 7) });
    let t = frames[0].trade().unwrap();
    assert_eq!(t.price.to_native(), 8_723_201);
    assert!(t.is_buyer_maker);
    let k = frames[1].kline().unwrap();
    assert_eq!(k.trade_count.to_native(), 2);
    assert_eq!(k.high.to_native(), 8_723_500);
    assert_eq!(k.taker_buy_volume.to_native(), 7);
    assert!(k.closed);
    assert_eq!(frames[2].heartbeat().unwrap().last_seq.to_native(), 99);
    assert!(matches!(frames[1].trade(), Err(FrameDecodeError::WrongKind { .. })));
    assert_eq!(frames[1].to_owned_body().unwrap(), mdbus_schema::frame::Body::Kline(kline()));
}

#[test]
fn json_lines_use_binance_field_names_and_decimal_strings() {
    let w = encoded();
    let mut lines = Vec::new();
    for f in FrameIter::new(w.as_bytes()) {
        let mut s = String::new();
        write_frame_line(&mut s, &f.unwrap()).unwrap();
        lines.push(s);
    }
    assert_eq!(
        lines[0],
        r#"{"seq":7,"kind":"trade","E":1709251200000,"s":"BTCUSDT","t":4242424242,"p":"87232.01000000","q":"0.01250000","T":1709251199999,"m":true}"#
    );
    assert_eq!(
        lines[1],
        r#"{"seq":8,"kind":"kline","E":1709251200000,"s":"BTCUSDT","k":{"t":1709251140000,"T":1709251199999,"s":"BTCUSDT","i":"1m","f":4242424242,"L":4242424243,"o":"87232.01000000","c":"87235.00000000","h":"87235.00000000","l":"87232.01000000","v":"0.01257000","n":2,"x":true,"q":"1096.50657500","V":"0.00007000","Q":"6.10645000","B":"0"}}"#
    );
    assert_eq!(
        lines[2],
        r#"{"seq":8,"kind":"heartbeat","E":1709251200000,"publisher":"0123456789abcdef","feed":"live","interval_ms":100}"#
    );
}

/// Copies bytes into a 16-aligned buffer, as shared memory and the WAL hand them to readers.
fn aligned(bytes: &[u8]) -> rkyv::util::AlignedVec<16> {
    let mut v = rkyv::util::AlignedVec::<16>::new();
    v.extend_from_slice(bytes);
    v
}

fn decode_all(bytes: &[u8]) -> Result<usize, FrameDecodeError> {
    let mut n = 0;
    for f in FrameIter::new(bytes) {
        let f = f?;
        match f.kind() {
            FrameKind::Trade => drop(f.trade()?),
            FrameKind::Kline => drop(f.kline()?),
            FrameKind::Heartbeat => drop(f.heartbeat()?),
            FrameKind::Snapshot => drop(f.snapshot_mark()?),
        }
        n += 1;
    }
    Ok(n)
}

#[test]
fn every_truncation_of_a_batch_is_an_error_not_a_panic() {
    let w = encoded();
    let b = w.as_bytes();
    let t = encoded_frame_len(FrameKind::Trade);
    let k = encoded_frame_len(FrameKind::Kline);
    for cut in 1..b.len() {
        let buf = aligned(&b[..cut]);
        let r = decode_all(&buf);
        // A cut on a frame boundary is a shorter, valid batch; any other cut is an error.
        match cut {
            c if c == t => assert_eq!(r, Ok(1)),
            c if c == t + k => assert_eq!(r, Ok(2)),
            _ => assert!(r.is_err(), "cut at {cut} decoded as {r:?}"),
        }
    }
}

#[test]
fn a_wrong_version_or_magic_or_kind_is_refused() {
    let w = encoded();
    let mut b = aligned(w.as_bytes());
    b[4] = 2;
    assert_eq!(decode_all(&b), Err(FrameDecodeError::UnsupportedVersion { offset: 0, found: 2 }));
    let mut b = aligned(w.as_bytes());
    b[0] = b'X';
    assert!(matches!(decode_all(&b), Err(FrameDecodeError::BadMagic { offset: 0, .. })));
    let mut b = aligned(w.as_bytes());
    b[6] = 9;
    assert_eq!(decode_all(&b), Err(FrameDecodeError::UnknownKind { offset: 0, kind: 9 }));
}

#[test]
fn corrupt_fields_inside_a_valid_archive_are_refused() {
    let w = encoded();
    let kline_off = encoded_frame_len(FrameKind::Trade);
    let body = kline_off + FRAME_HEADER_LEN;
    // Symbol bytes are the first 24 of the archived K-line.
    let mut b = aligned(w.as_bytes());
    b[body] = b'"';
    assert_eq!(decode_all(&b), Err(FrameDecodeError::InvalidField { seq: 8, field: "symbol" }));
    // The interval byte follows symbol (24) and symbol_id (4).
    let mut b = aligned(w.as_bytes());
    b[body + 28] = 16;
    assert_eq!(decode_all(&b), Err(FrameDecodeError::InvalidField { seq: 8, field: "interval" }));
    // The `closed` bool (offset 31) must be 0 or 1: bytecheck refuses 2.
    let mut b = aligned(w.as_bytes());
    b[body + 31] = 2;
    assert_eq!(decode_all(&b), Err(FrameDecodeError::InvalidBody { seq: 8, kind: FrameKind::Kline }));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_all(&aligned(&bytes));
        let _ = decode_all(&bytes);
    }

    #[test]
    fn random_corruption_of_a_valid_batch_never_panics(pos in 0usize..10_000, val in any::<u8>()) {
        let w = encoded();
        let mut b = aligned(w.as_bytes());
        let i = pos % b.len();
        b[i] = val;
        if let Ok(n) = decode_all(&b) {
            prop_assert_eq!(n, 3);
            for f in FrameIter::new(&b) {
                let mut s = String::new();
                let _ = write_frame_line(&mut s, &f.unwrap());
            }
        }
    }
}

#[test]
fn publish_time_is_stamped_on_every_frame_and_nothing_else() {
    let mut w = encoded();
    let before = w.as_bytes().to_vec();
    w.set_publish_time(42);
    let frames: Vec<_> = FrameIter::new(w.as_bytes()).collect::<Result<_, _>>().unwrap();
    assert_eq!(frames.len(), 3);
    assert!(frames.iter().all(|f| f.header.ts_publish_ns == 42));
    let changed: Vec<usize> = (0..before.len()).filter(|&i| before[i] != w.as_bytes()[i]).collect();
    let starts = [
        0,
        encoded_frame_len(FrameKind::Trade),
        encoded_frame_len(FrameKind::Trade) + encoded_frame_len(FrameKind::Kline),
    ];
    assert!(changed.iter().all(|&i| starts.iter().any(|&s| (s + 40..s + 48).contains(&i))), "{changed:?}");
}

#[test]
fn snapshot_marks_round_trip_and_render_as_json() {
    use mdbus_schema::frame::Body;
    use mdbus_schema::{SnapshotMark, SnapshotPhase};
    let m = SnapshotMark {
        snapshot_id: 42,
        covered_seq: 1_000_000,
        publisher_id: 0xfeed,
        rows: 160_000,
        wal_from_seq: 999_000,
        phase: SnapshotPhase::End as u8,
    };
    let mut w = FrameWriter::with_capacity(256);
    w.push_snapshot_mark(header(FrameKind::Snapshot, 2, 7), &m).unwrap();
    let f = mdbus_schema::FrameRef::parse(w.as_bytes()).unwrap();
    assert_eq!(f.kind(), FrameKind::Snapshot);
    assert_eq!(f.to_owned_body().unwrap(), Body::Snapshot(m));
    let mut line = String::new();
    write_frame_line(&mut line, &f).unwrap();
    assert!(line.starts_with(r#"{"seq":7,"kind":"snapshot","#), "{line}");
    assert!(
        line.contains(r#""phase":"end","snapshot_id":42,"covered_seq":1000000,"rows":160000,"wal_from_seq":999000"#),
        "{line}"
    );
    // An unknown phase is refused, not rendered.
    let mut bad = w.as_bytes().to_vec();
    let body_at = mdbus_schema::FRAME_HEADER_LEN + std::mem::offset_of!(mdbus_schema::ArchivedSnapshotMark, phase);
    bad[body_at] = 9;
    let bad = aligned(&bad);
    assert!(mdbus_schema::FrameRef::parse(&bad).unwrap().snapshot_mark().is_err());
}

/// A swapped-out buffer holds exactly the frames written so far; the writer goes on from empty in
/// the spare buffer (its old contents cleared), and frames written there start a fresh sample.
#[test]
fn swapping_the_buffer_hands_over_the_frames_and_leaves_the_writer_empty() {
    let mut w = encoded();
    let mut spare = mdbus_schema::frame::FrameBuffer::with_capacity(1024);
    spare.extend_from_slice(b"stale bytes of an earlier sample");
    let full = w.swap_buffer(spare);
    assert_eq!(hex(&full), GOLDEN);
    assert!(w.is_empty());
    assert_eq!(w.frames(), 0);
    assert!((w.as_bytes().as_ptr() as usize).is_multiple_of(mdbus_schema::frame::FRAME_ALIGN));
    w.push_trade(hdr(FrameKind::Trade, 9), &trade()).unwrap();
    assert_eq!(w.frames(), 1);
    let seqs: Vec<u64> = FrameIter::new(w.as_bytes()).map(|f| f.unwrap().seq()).collect();
    assert_eq!(seqs, vec![9]);
}
