//! The Prometheus text format (version 0.0.4), written straight into one buffer.
//!
//! `prometheus::TextEncoder` writes the same bytes, but through a `dyn Write` with one call per
//! fragment and a `String` allocation per sample value; at 1,000 series that was a quarter of a
//! scrape (see BENCHMARKS.md). It also panics on untyped families (`unimplemented!`), which a
//! collector registered by the application may produce; here they are written like gauges with
//! `# TYPE … untyped`, as the format specifies. Output is otherwise byte-identical, which the
//! tests below check against `prometheus::TextEncoder`.

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};
use std::fmt::Write;

/// Encodes `families` into `out`, failing like `prometheus::TextEncoder` on a family without
/// samples or without a name.
pub(crate) fn encode(families: &[MetricFamily], out: &mut String) -> Result<(), String> {
    for family in families {
        let name = family.name();
        if family.get_metric().is_empty() {
            return Err(format!("MetricFamily {name:?} has no metrics"));
        }
        if name.is_empty() {
            return Err("a MetricFamily has no name".to_owned());
        }
        let help = family.help();
        if !help.is_empty() {
            out.push_str("# HELP ");
            out.push_str(name);
            out.push(' ');
            escape(out, help, false);
            out.push('\n');
        }
        let kind = family.get_field_type();
        out.push_str("# TYPE ");
        out.push_str(name);
        out.push_str(match kind {
            MetricType::COUNTER => " counter\n",
            MetricType::GAUGE => " gauge\n",
            MetricType::SUMMARY => " summary\n",
            MetricType::UNTYPED => " untyped\n",
            MetricType::HISTOGRAM => " histogram\n",
        });
        // The series of a histogram family nearly always share their bucket bounds: format
        // each bound once per family, not once per series.
        let mut bounds = Bounds::default();
        for metric in family.get_metric() {
            match kind {
                MetricType::COUNTER => sample(
                    out,
                    name,
                    "",
                    metric,
                    None,
                    metric.get_counter().get_value(),
                ),
                MetricType::GAUGE => {
                    sample(out, name, "", metric, None, metric.get_gauge().get_value())
                }
                // The prometheus crate keeps untyped values only for compatibility.
                #[allow(deprecated)]
                MetricType::UNTYPED => sample(
                    out,
                    name,
                    "",
                    metric,
                    None,
                    metric.get_untyped().get_value(),
                ),
                MetricType::HISTOGRAM => {
                    let histogram = metric.get_histogram();
                    let mut infinity_seen = false;
                    for (i, bucket) in histogram.get_bucket().iter().enumerate() {
                        let upper = bucket.upper_bound();
                        let bound = bounds.get(i, upper);
                        let count = bucket.cumulative_count() as f64;
                        sample(out, name, "_bucket", metric, Some(("le", bound)), count);
                        infinity_seen |= upper.is_sign_positive() && upper.is_infinite();
                    }
                    let count = histogram.get_sample_count() as f64;
                    if !infinity_seen {
                        sample(out, name, "_bucket", metric, Some(("le", "+Inf")), count);
                    }
                    sample(out, name, "_sum", metric, None, histogram.get_sample_sum());
                    sample(out, name, "_count", metric, None, count);
                }
                MetricType::SUMMARY => {
                    let summary = metric.get_summary();
                    let mut quantile = String::new();
                    for q in summary.get_quantile() {
                        quantile.clear();
                        let _ = write!(quantile, "{}", q.quantile());
                        sample(
                            out,
                            name,
                            "",
                            metric,
                            Some(("quantile", &quantile)),
                            q.value(),
                        );
                    }
                    sample(out, name, "_sum", metric, None, summary.sample_sum());
                    let count = summary.sample_count() as f64;
                    sample(out, name, "_count", metric, None, count);
                }
            }
        }
    }
    Ok(())
}

/// One line: `name<suffix>{labels} value [timestamp]`.
fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    metric: &Metric,
    extra: Option<(&str, &str)>,
    value: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    labels(out, metric.get_label(), extra);
    out.push(' ');
    number(out, value);
    let timestamp = metric.timestamp_ms();
    if timestamp != 0 {
        out.push(' ');
        integer(out, timestamp);
    }
    out.push('\n');
}

/// Writes `value` as `f64`'s `Display` does. Integral values (every counter, bucket and count,
/// most gauges) take a fast path with the same digits: float formatting was over half of the
/// encoding's time.
fn number(out: &mut String, value: f64) {
    /// Below 2^53 every integral `f64` converts to `i64` exactly.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    // `fract()` is NaN for NaN and the infinities; -0.0 prints as "-0", so it is left to
    // `Display` too.
    if value.fract() == 0.0 && value.abs() < EXACT && !(value == 0.0 && value.is_sign_negative()) {
        integer(out, value as i64);
    } else {
        // Writing to a String cannot fail.
        let _ = write!(out, "{value}");
    }
}

/// Writes `n` in decimal, as its `Display` does.
fn integer(out: &mut String, n: i64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        out.push('-');
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(&digits[start..]).unwrap_or_default());
}

/// The formatted `le` bounds of one histogram family, by bucket position.
#[derive(Default)]
struct Bounds(Vec<(u64, String)>);

impl Bounds {
    /// Bucket `i`'s bound `upper` as text, formatted only if it differs from the last series'.
    fn get(&mut self, i: usize, upper: f64) -> &str {
        let bits = upper.to_bits();
        if i == self.0.len() {
            self.0.push((bits, String::new()));
        } else if self.0[i].0 == bits {
            return &self.0[i].1;
        }
        let (cached, text) = &mut self.0[i];
        *cached = bits;
        text.clear();
        let _ = write!(text, "{upper}");
        text
    }
}

fn labels(out: &mut String, pairs: &[LabelPair], extra: Option<(&str, &str)>) {
    if pairs.is_empty() && extra.is_none() {
        return;
    }
    let mut separator = '{';
    for (name, value) in pairs
        .iter()
        .map(|pair| (pair.name(), pair.value()))
        .chain(extra)
    {
        out.push(separator);
        out.push_str(name);
        out.push_str("=\"");
        escape(out, value, true);
        out.push('"');
        separator = ',';
    }
    out.push('}');
}

/// Escapes `\` and line feeds (and `"` in label values), as the format requires.
fn escape(out: &mut String, text: &str, quotes: bool) {
    let special = |b: &u8| *b == b'\\' || *b == b'\n' || (quotes && *b == b'"');
    if !text.as_bytes().iter().any(special) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::core::Collector;
    use prometheus::{Encoder, Opts};

    fn theirs(families: &[MetricFamily]) -> String {
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(families, &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn ours(families: &[MetricFamily]) -> String {
        let mut out = String::new();
        encode(families, &mut out).unwrap();
        out
    }

    #[test]
    fn byte_identical_to_prometheus_text_encoder() {
        let counter = prometheus::CounterVec::new(
            Opts::new("requests_total", "Requests \\ with \"quotes\"\nand lines"),
            &["route", "status"],
        )
        .unwrap();
        counter.with_label_values(&["/a", "200"]).inc_by(3.0);
        counter
            .with_label_values(&["/b\"q\"\\x\ny", "500"])
            .inc_by(0.25);
        let gauge = prometheus::Gauge::new("temperature", "Degrees").unwrap();
        gauge.set(-1.5e-7);
        let histogram = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new("latency_seconds", "Latency")
                .buckets(vec![0.005, 0.1, 1.0, 2.5]),
            &["route"],
        )
        .unwrap();
        histogram.with_label_values(&["/a"]).observe(0.05);
        histogram.with_label_values(&["/a"]).observe(3.0);
        let mut families = counter.collect();
        families.extend(gauge.collect());
        families.extend(histogram.collect());

        // A summary and a timestamp, which the prometheus crate's collectors never produce.
        let mut summary_family = MetricFamily::default();
        // No help text: the HELP line is left out.
        summary_family.set_name("rpc_seconds".to_owned());
        summary_family.set_field_type(MetricType::SUMMARY);
        let mut metric = Metric::default();
        metric.set_timestamp_ms(1_700_000_000_000);
        let mut summary = prometheus::proto::Summary::default();
        summary.set_sample_count(7);
        summary.set_sample_sum(1.75);
        let mut quantile = prometheus::proto::Quantile::default();
        quantile.set_quantile(0.99);
        quantile.set_value(0.5);
        summary.set_quantile(vec![quantile]);
        metric.set_summary(summary);
        summary_family.mut_metric().push(metric);
        families.push(summary_family);

        let expected = theirs(&families);
        assert!(expected.contains("le=\"+Inf\""), "{expected}");
        assert_eq!(ours(&families), expected);
    }

    #[test]
    fn numbers_print_as_display_does() {
        let mut values = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            -2.5e-9,
            1e15,
            9_007_199_254_740_991.0,
            9_007_199_254_740_992.0,
            -9_007_199_254_740_992.0,
            1e21,
            1.5e300,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            f64::EPSILON,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            i64::MAX as f64,
            i64::MIN as f64,
        ];
        // And a spread of integral and fractional values of every magnitude.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let magnitude = 10f64.powi((x % 40) as i32 - 10);
            let v = (x >> 11) as f64 / (1u64 << 53) as f64 * magnitude;
            values.extend([v, -v, v.trunc(), -v.trunc()]);
        }
        for v in values {
            let mut ours = String::new();
            number(&mut ours, v);
            assert_eq!(ours, format!("{v}"), "{v:e}");
        }
        for n in [0, 7, -7, 1_700_000_000_000, i64::MAX, i64::MIN] {
            let mut ours = String::new();
            integer(&mut ours, n);
            assert_eq!(ours, n.to_string());
        }
    }

    #[test]
    fn histogram_series_with_different_bounds() {
        let mut family = MetricFamily::default();
        family.set_name("size_bytes".to_owned());
        family.set_field_type(MetricType::HISTOGRAM);
        for (route, bounds) in [
            ("/a", vec![1.0, 10.0]),
            ("/b", vec![1.0, 10.0]),
            ("/c", vec![0.5, 10.0, 100.0, f64::INFINITY]),
            ("/d", vec![1.0]),
        ] {
            let mut metric = Metric::default();
            let mut label = LabelPair::default();
            label.set_name("route".to_owned());
            label.set_value(route.to_owned());
            metric.set_label(vec![label]);
            let mut histogram = prometheus::proto::Histogram::default();
            histogram.set_sample_count(3);
            histogram.set_sample_sum(12.5);
            let buckets = bounds
                .iter()
                .enumerate()
                .map(|(i, &upper)| {
                    let mut bucket = prometheus::proto::Bucket::default();
                    bucket.set_upper_bound(upper);
                    bucket.set_cumulative_count(i as u64 + 1);
                    bucket
                })
                .collect();
            histogram.set_bucket(buckets);
            metric.set_histogram(histogram);
            family.mut_metric().push(metric);
        }
        let families = [family];
        let expected = theirs(&families);
        assert!(expected.contains("size_bytes_bucket{route=\"/c\",le=\"0.5\"} 1"));
        assert!(expected.contains("size_bytes_bucket{route=\"/d\",le=\"1\"} 1"));
        assert_eq!(ours(&families), expected);
    }

    #[test]
    fn untyped_families_do_not_panic() {
        let mut family = MetricFamily::default();
        family.set_name("legacy".to_owned());
        family.set_field_type(MetricType::UNTYPED);
        let mut metric = Metric::default();
        let mut untyped = prometheus::proto::Untyped::default();
        #[allow(deprecated)]
        {
            untyped.set_value(4.0);
            metric.set_untyped(untyped);
        }
        family.mut_metric().push(metric);
        assert_eq!(ours(&[family]), "# TYPE legacy untyped\nlegacy 4\n");
    }

    #[test]
    fn refuses_what_the_format_cannot_say() {
        let mut family = MetricFamily::default();
        family.set_name("empty".to_owned());
        assert!(encode(&[family], &mut String::new())
            .unwrap_err()
            .contains("has no metrics"));
        let mut nameless = MetricFamily::default();
        nameless.mut_metric().push(Metric::default());
        assert_eq!(
            encode(&[nameless], &mut String::new()).unwrap_err(),
            "a MetricFamily has no name"
        );
    }
}
