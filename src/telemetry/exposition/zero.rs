//! Histograms exported at zero before their first measurement.
//!
//! OpenTelemetry exports a histogram's series only once something was recorded under its
//! attributes, so a histogram of rare events (purges) has no series to alert or graph on until
//! the first one. A [`ZeroHistogram`] fills them in after each gather: every series it names
//! that the exposition lacks is written with zero counts, shaped after a counter of the same
//! instrumentation (its name prefix, that is the namespace, and its other labels such as
//! `otel_scope_name`), so the filled series are the ones the first measurement will bring.

use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};

/// A histogram family written with zero counts where it has no series yet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ZeroHistogram {
    /// The name (without namespace) of a counter of the same meter that always has series
    /// (exported at 0 from the start); its namespace and labels are copied.
    pub(crate) beside: &'static str,
    /// The counter's own attribute names, not copied.
    pub(crate) beside_attributes: &'static [&'static str],
    /// The histogram's name without namespace, as the exporter writes it.
    pub(crate) name: &'static str,
    /// Its help text, as the exporter writes it.
    pub(crate) help: &'static str,
    /// The attribute that tells its series apart, and each value it takes.
    pub(crate) attribute: &'static str,
    pub(crate) values: &'static [&'static str],
    /// Its bucket bounds (without `+Inf`).
    pub(crate) bounds: &'static [f64],
}

impl ZeroHistogram {
    /// Adds the series of this histogram missing from `families` (sorted by name, as
    /// `Registry::gather` returns them), at zero.
    pub(crate) fn fill(&self, families: &mut Vec<MetricFamily>) {
        let Some(beside) = families.iter().find(|family| {
            family
                .name()
                .strip_suffix(self.beside)
                .is_some_and(|prefix| prefix.is_empty() || prefix.ends_with('_'))
        }) else {
            return;
        };
        let prefix = &beside.name()[..beside.name().len() - self.beside.len()];
        let name = format!("{prefix}{}", self.name);
        let Some(shape) = beside.get_metric().first() else {
            return;
        };
        let common: Vec<LabelPair> = shape
            .get_label()
            .iter()
            .filter(|label| !self.beside_attributes.contains(&label.name()))
            .cloned()
            .collect();

        let index = match families.binary_search_by(|family| family.name().cmp(&name)) {
            Ok(index) => index,
            Err(index) => {
                let mut family = MetricFamily::default();
                family.set_name(name.clone());
                family.set_help(self.help.to_owned());
                family.set_field_type(MetricType::HISTOGRAM);
                families.insert(index, family);
                index
            }
        };
        let family = &mut families[index];
        if family.get_field_type() != MetricType::HISTOGRAM {
            return;
        }
        for value in self.values {
            let present = family.get_metric().iter().any(|metric| {
                metric
                    .get_label()
                    .iter()
                    .any(|label| label.name() == self.attribute && label.value() == *value)
            });
            if !present {
                family.mut_metric().push(self.series(value, &common));
            }
        }
        // Series in the order of their labels, as the exporter sorts them.
        family.mut_metric().sort_by(|a, b| {
            let values = |metric: &Metric| {
                metric
                    .get_label()
                    .iter()
                    .map(|label| label.value().to_owned())
                    .collect::<Vec<_>>()
            };
            values(a).cmp(&values(b))
        });
    }

    fn series(&self, value: &str, common: &[LabelPair]) -> Metric {
        let mut label = LabelPair::default();
        label.set_name(self.attribute.to_owned());
        label.set_value(value.to_owned());
        let mut labels = vec![label];
        labels.extend_from_slice(common);
        let mut histogram = Histogram::default();
        histogram.set_sample_count(0);
        histogram.set_sample_sum(0.0);
        histogram.set_bucket(
            self.bounds
                .iter()
                .map(|&bound| {
                    let mut bucket = Bucket::default();
                    bucket.set_upper_bound(bound);
                    bucket.set_cumulative_count(0);
                    bucket
                })
                .collect(),
        );
        let mut metric = Metric::from_label(labels);
        metric.set_histogram(histogram);
        metric
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::exposition::encode::encode;
    use opentelemetry::metrics::MeterProvider;
    use opentelemetry::KeyValue;
    use opentelemetry_sdk::metrics::SdkMeterProvider;

    const LATENCY: ZeroHistogram = ZeroHistogram {
        beside: "jobs_total",
        beside_attributes: &["kind", "result"],
        name: "job_duration_seconds",
        help: "Time a job took",
        attribute: "kind",
        values: &["fast", "slow"],
        bounds: &[0.1, 1.0],
    };

    /// An exporter with `namespace`, a counter of both kinds at 0, and what it exports after
    /// `record` ran on the histogram, with and without the fill.
    fn exposition(
        namespace: &str,
        record: impl FnOnce(&opentelemetry::metrics::Histogram<f64>),
    ) -> (String, String) {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .with_namespace(namespace)
            .build()
            .unwrap();
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("scope");
        let jobs = meter.u64_counter("jobs").build();
        for kind in ["fast", "slow"] {
            jobs.add(
                0,
                &[KeyValue::new("kind", kind), KeyValue::new("result", "ok")],
            );
        }
        let histogram = meter
            .f64_histogram("job.duration")
            .with_unit("s")
            .with_description("Time a job took")
            .with_boundaries(LATENCY.bounds.to_vec())
            .build();
        record(&histogram);
        let mut families = registry.gather();
        let mut plain = String::new();
        encode(&families, &mut plain).unwrap();
        LATENCY.fill(&mut families);
        let mut filled = String::new();
        encode(&families, &mut filled).unwrap();
        (plain, filled)
    }

    #[test]
    fn before_any_measurement_every_series_is_written_at_zero() {
        let (plain, filled) = exposition("app", |_| {});
        assert!(!plain.contains("job_duration"), "{plain}");
        for kind in ["fast", "slow"] {
            let labels = format!("kind=\"{kind}\",otel_scope_name=\"scope\"");
            for sample in [
                format!("app_job_duration_seconds_bucket{{{labels},le=\"0.1\"}} 0"),
                format!("app_job_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 0"),
                format!("app_job_duration_seconds_sum{{{labels}}} 0"),
                format!("app_job_duration_seconds_count{{{labels}}} 0"),
            ] {
                assert!(filled.contains(&sample), "{sample} not in {filled}");
            }
        }
        assert!(filled.contains("# TYPE app_job_duration_seconds histogram\n"));
        assert!(filled.contains("# HELP app_job_duration_seconds Time a job took\n"));
    }

    #[test]
    fn after_a_measurement_the_filled_series_match_the_exporters() {
        let (plain, filled) = exposition("app", |histogram| {
            histogram.record(0.5, &[KeyValue::new("kind", "slow")]);
        });
        // The measured series is the exporter's own, and the missing one is shaped like it.
        let slow: Vec<&str> = plain
            .lines()
            .filter(|line| line.starts_with("app_job_duration"))
            .collect();
        assert_eq!(slow.len(), 5, "{plain}");
        for line in &slow {
            assert!(filled.contains(line), "{line} lost from {filled}");
            let fast = line.replace("slow", "fast");
            let fast = fast.rsplit_once(' ').unwrap().0;
            assert!(
                filled.contains(&format!("{fast} 0\n")),
                "{fast} 0 not in {filled}"
            );
        }
        // The fast series comes first, as the exporter orders series.
        let first = filled.find("kind=\"fast\"").unwrap();
        assert!(first < filled.find("kind=\"slow\"").unwrap());
    }

    #[test]
    fn nothing_is_added_without_the_counter_it_goes_beside() {
        let mut families = Vec::new();
        LATENCY.fill(&mut families);
        assert!(families.is_empty());
    }
}
