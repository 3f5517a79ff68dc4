//! Building a scrape (the `prometheus` crate's data model and text encoder) and reading one back
//! (`mdbus stats`, tests).

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};
use prometheus::Encoder;

use crate::latency::Latency;

/// The metric families of one scrape, in the order they were added; samples with the same name
/// and different labels go into one family.
#[derive(Debug, Default)]
pub struct Families {
    families: Vec<MetricFamily>,
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_owned());
            l.set_value((*v).to_owned());
            l
        })
        .collect()
}

impl Families {
    pub fn new() -> Families {
        Families::default()
    }

    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> &mut MetricFamily {
        let at = match self.families.iter().position(|f| f.name() == name) {
            Some(i) => {
                debug_assert!(self.families[i].get_field_type() == kind, "{name} added with two types");
                i
            }
            None => {
                let mut f = MetricFamily::default();
                f.set_name(name.to_owned());
                f.set_help(help.to_owned());
                f.set_field_type(kind);
                self.families.push(f);
                self.families.len() - 1
            }
        };
        &mut self.families[at]
    }

    /// A monotone count.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.counter_with(name, help, &[], value)
    }

    pub fn counter_with(&mut self, name: &str, help: &str, label_pairs: &[(&str, &str)], value: u64) -> &mut Self {
        let mut c = Counter::default();
        c.set_value(value as f64);
        let mut m = Metric::from_label(labels(label_pairs));
        m.set_counter(c);
        self.family(name, help, MetricType::COUNTER).mut_metric().push(m);
        self
    }

    /// A value that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.gauge_with(name, help, &[], value)
    }

    pub fn gauge_with(&mut self, name: &str, help: &str, label_pairs: &[(&str, &str)], value: f64) -> &mut Self {
        let mut g = Gauge::default();
        g.set_value(value);
        let mut m = Metric::from_label(labels(label_pairs));
        m.set_gauge(g);
        self.family(name, help, MetricType::GAUGE).mut_metric().push(m);
        self
    }

    /// A latency distribution as a summary: quantiles 0.5, 0.95, 0.99, 0.999, plus sum and count.
    pub fn latency(&mut self, l: &Latency) -> &mut Self {
        let s = l.snapshot();
        let mut summary = Summary::default();
        summary.set_sample_count(s.count);
        summary.set_sample_sum(s.sum as f64);
        summary.set_quantile(
            [(0.5, s.p50), (0.95, s.p95), (0.99, s.p99), (0.999, s.p999)]
                .iter()
                .map(|&(q, v)| {
                    let mut x = Quantile::default();
                    x.set_quantile(q);
                    x.set_value(v as f64);
                    x
                })
                .collect(),
        );
        let mut m = Metric::default();
        m.set_summary(summary);
        self.family(l.name(), l.help(), MetricType::SUMMARY).mut_metric().push(m);
        self
    }

    /// The text exposition format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.families, &mut out) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// One sample of a scrape: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Label pairs in the order written.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Reads the samples of a text-format scrape (comments skipped; label values without escapes
/// other than `\"` and `\\`, which is all the encoder above writes for our labels). Lines that do
/// not parse are skipped.
pub fn parse_text(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    if name.is_empty() {
        return None;
    }
    let mut labels = Vec::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let end = body.rfind('}')?;
        let mut s = &body[..end];
        while !s.is_empty() {
            let eq = s.find('=')?;
            let key = s[..eq].trim_start_matches(',').trim().to_owned();
            let after = s[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let mut close = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(if n == 'n' { '\n' } else { n });
                        }
                    }
                    '"' => {
                        close = Some(i);
                        break;
                    }
                    c => value.push(c),
                }
            }
            labels.push((key, value));
            s = &after[close? + 1..];
        }
        &body[end + 1..]
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.to_owned(), labels, value })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_scrape_reads_back_as_written() {
        let l = Latency::new("x_latency_us", "a latency");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
        l.record(10, now);
        l.flush(now);
        let mut f = Families::new();
        f.counter("market_published_total", "frames published", 42)
            .gauge_with("market_last_seq", "last seq", &[("stream", "realtime")], 7.0)
            .gauge_with("market_last_seq", "last seq", &[("stream", "snap\"shot")], 8.0)
            .latency(&l);
        let text = f.encode();
        assert!(text.contains("# TYPE market_published_total counter"), "{text}");
        assert!(text.contains("# TYPE x_latency_us summary"), "{text}");
        let s = parse_text(&text);
        let get = |n: &str, k: &str, v: &str| {
            s.iter().find(|x| x.name == n && (k.is_empty() || x.label(k) == Some(v))).map(|x| x.value)
        };
        assert_eq!(get("market_published_total", "", ""), Some(42.0));
        assert_eq!(get("market_last_seq", "stream", "realtime"), Some(7.0));
        assert_eq!(get("market_last_seq", "stream", "snap\"shot"), Some(8.0));
        assert_eq!(get("x_latency_us", "quantile", "0.99"), Some(10.0));
        assert_eq!(get("x_latency_us_count", "", ""), Some(1.0));
        assert_eq!(get("x_latency_us_sum", "", ""), Some(10.0));
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let s = parse_text("# HELP x\nfoo{a=\"1\" 3\nbar 2\n{} 1\nbaz{a=\"x\"} nope\nqux{a=\"1\",b=\"2\"} 5\n");
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[1].labels, vec![("a".into(), "1".into()), ("b".into(), "2".into())]);
    }
}
