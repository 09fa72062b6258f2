//! The per-request instruments of OpenTelemetry's HTTP conventions that the layer records:
//! bytes allocated per request (a histogram) and bytes kept (an up-down counter).

use opentelemetry::metrics::{BoundHistogram, Histogram, Meter};
use opentelemetry::KeyValue;

/// Bucket bounds of `http.server.request.allocated`: 1 KiB to 1 GiB, a factor of 4 apart
/// (11 bounds, 12 buckets), so that a handler's bytes land in a bucket that tells a small
/// request from a large one at every scale.
pub(crate) const ALLOCATED_BOUNDS: [f64; 11] = [
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
];

/// The histogram a request's bytes go into.
#[derive(Debug)]
pub(crate) struct RequestInstruments {
    allocated: Histogram<u64>,
}

impl RequestInstruments {
    /// `http.server.request.allocated` (unit `By`), exported to Prometheus as
    /// `http_server_request_allocated_bytes_{bucket,sum,count}`.
    pub(crate) fn new(meter: &Meter) -> Self {
        let allocated = meter
            .u64_histogram("http.server.request.allocated")
            .with_unit("By")
            .with_description(
                "Bytes allocated while serving a request (its future and body, on every \
                 thread that polled them)",
            )
            .with_boundaries(ALLOCATED_BOUNDS.to_vec())
            .build();
        Self { allocated }
    }

    /// The histogram bound to one series' attributes: recording through it does not hash
    /// them again (1,559 instructions a record with three attributes, against about 150
    /// bound). Bound once per series, when the series is first seen.
    pub(crate) fn bind(&self, attributes: &[KeyValue]) -> BoundHistogram<u64> {
        self.allocated.bind(attributes)
    }

    /// Registers `http.server.request.kept` (unit `By`, exported as
    /// `http_server_request_kept_bytes`): the bytes requests allocated and did not free,
    /// summed per attribute set. `each` is called on every collection with a function to
    /// report each attribute set's total with.
    pub(crate) fn observe_kept<F>(&self, meter: &Meter, each: F)
    where
        F: Fn(&mut dyn FnMut(i64, &[KeyValue])) + Send + Sync + 'static,
    {
        let _kept = meter
            .i64_observable_up_down_counter("http.server.request.kept")
            .with_unit("By")
            .with_description(
                "Bytes requests allocated and did not free before they ended (allocated \
                 minus freed), summed",
            )
            .with_callback(move |observer| {
                each(&mut |value, attributes| observer.observe(value, attributes))
            })
            .build();
    }
}
