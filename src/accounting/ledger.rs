//! The layer's ledger of bytes per route: route names interned under a cap, and one series
//! per method, route and status, each with its attribute set built once.

use crate::telemetry::requests::RequestInstruments;
use http::Method;
use opentelemetry::metrics::{BoundHistogram, Meter};
use opentelemetry::KeyValue;
use serde::Serialize;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The default cap on distinct `http.route` values
/// ([`max_routes`](crate::JemallocLayerBuilder::max_routes)).
pub const DEFAULT_MAX_ROUTES: usize = 100;

/// `http.route` of a request no route matched (or whose route was never told): one value for
/// all of them. In parentheses, so that it cannot be a route template, which starts with `/`.
pub const UNMATCHED_ROUTE: &str = "(unmatched)";

/// `http.route` of the routes past the cap, all folded into one value.
pub const OTHER_ROUTE: &str = "(other)";

/// Route ids 0 and 1 are the two values above.
pub(crate) const UNMATCHED: u32 = 0;
const OTHER: u32 = 1;

/// `http.request.method` values, as OpenTelemetry's HTTP conventions list them: the known
/// methods, and `_OTHER` for every other one (bounded by construction).
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "_OTHER",
];

/// The methods of [`METHODS`] but `_OTHER`, in its order, as `http`'s constants: comparing
/// to them tests the method's kind, where comparing names compared strings (32 instructions
/// for a `GET`).
const KNOWN_METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::CONNECT,
    Method::OPTIONS,
    Method::TRACE,
    Method::PATCH,
];

/// The index of `method` in [`METHODS`].
pub(crate) fn method_index(method: &Method) -> u8 {
    let index = KNOWN_METHODS
        .iter()
        .position(|known| known == method)
        .unwrap_or(METHODS.len() - 1);
    index as u8
}

/// One series: a method, a route and a status (0: no response, the request failed or went
/// away first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SeriesKey {
    pub(crate) route: u32,
    pub(crate) method: u8,
    pub(crate) status: u16,
}

impl SeriesKey {
    fn packed(self) -> u64 {
        (u64::from(self.route) << 32) | (u64::from(self.method) << 16) | u64::from(self.status)
    }
}

/// A series' running figures, and its attributes, built once, with the histogram bound to
/// them.
#[derive(Debug)]
struct Series {
    attributes: Vec<KeyValue>,
    allocated_histogram: BoundHistogram<u64>,
    requests: AtomicU64,
    allocated: AtomicU64,
    kept: AtomicI64,
}

/// The ledger's keys (series keys, and route names) are hashed eight bytes to a
/// multiplication rather than by SipHash: the tables hold at most `max_routes` names and
/// their series, so a collision an attacker could craft costs a few comparisons at most,
/// while SipHash cost every routed request about 500 instructions.
#[derive(Default)]
struct KeyHasher(u64);

const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
            self.write_u64(word);
        }
        let mut last = [0u8; 8];
        let rest = chunks.remainder();
        last[..rest.len()].copy_from_slice(rest);
        self.write_u64(u64::from_le_bytes(last) ^ ((rest.len() as u64) << 56));
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(SEED);
    }
}

type KeyHash = BuildHasherDefault<KeyHasher>;

#[derive(Debug)]
struct Book {
    /// Route name to id; ids index `names`.
    ids: HashMap<Box<str>, u32, KeyHash>,
    names: Vec<Arc<str>>,
    series: HashMap<u64, Arc<Series>, KeyHash>,
}

/// Bytes per route, for one layer.
#[derive(Debug)]
pub(crate) struct Ledger {
    max_routes: usize,
    instruments: RequestInstruments,
    book: RwLock<Book>,
}

/// A route's figures over its methods and statuses, for the stats hints and the page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteFigures {
    /// `http.request.method`.
    pub method: String,
    /// `http.route`.
    pub route: String,
    /// Requests recorded.
    pub requests: u64,
    /// Bytes they allocated, in all.
    pub allocated_bytes: u64,
    /// Bytes they allocated and did not free, in all (negative when they freed more).
    pub kept_bytes: i64,
}

impl Ledger {
    /// A ledger whose figures are exported through `meter`.
    pub(crate) fn new(meter: &Meter, max_routes: usize) -> Arc<Self> {
        let names: Vec<Arc<str>> = vec![UNMATCHED_ROUTE.into(), OTHER_ROUTE.into()];
        let ids = names
            .iter()
            .enumerate()
            .map(|(id, name)| (Box::<str>::from(&**name), id as u32))
            .collect();
        let ledger = Arc::new(Self {
            max_routes,
            instruments: RequestInstruments::new(meter),
            book: RwLock::new(Book {
                ids,
                names,
                series: HashMap::default(),
            }),
        });
        let weak = Arc::downgrade(&ledger);
        ledger.instruments.observe_kept(meter, move |observe| {
            if let Some(ledger) = weak.upgrade() {
                for series in ledger.read().series.values() {
                    observe(series.kept.load(Relaxed), &series.attributes);
                }
            }
        });
        ledger
    }

    fn read(&self) -> RwLockReadGuard<'_, Book> {
        self.book
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Book> {
        self.book
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The id of route `name`: its own while fewer than `max_routes` routes are known,
    /// [`OTHER_ROUTE`]'s after.
    pub(crate) fn route_id(&self, name: &str) -> u32 {
        {
            let book = self.read();
            if let Some(&id) = book.ids.get(name) {
                return id;
            }
            // Full: no write lock for each new name past the cap.
            if book.names.len() - 2 >= self.max_routes {
                return OTHER;
            }
        }
        let mut book = self.write();
        if let Some(&id) = book.ids.get(name) {
            return id;
        }
        // The two fixed values do not count against the cap.
        if book.names.len() - 2 >= self.max_routes {
            return OTHER;
        }
        let id = book.names.len() as u32;
        book.names.push(name.into());
        book.ids.insert(name.into(), id);
        id
    }

    /// The id of route `name` if it is known already.
    pub(crate) fn known_route_id(&self, name: &str) -> Option<u32> {
        self.read().ids.get(name).copied()
    }

    /// Records one request: `allocated` into the histogram, `allocated - freed` into the
    /// bytes kept.
    pub(crate) fn record(&self, key: SeriesKey, allocated: u64, freed: u64) {
        let series = self.series(key);
        // Outside the ledger's lock, as every call into the SDK is.
        series.allocated_histogram.record(allocated);
        series.requests.fetch_add(1, Relaxed);
        series.allocated.fetch_add(allocated, Relaxed);
        let kept = allocated.wrapping_sub(freed) as i64;
        series.kept.fetch_add(kept, Relaxed);
    }

    fn series(&self, key: SeriesKey) -> Arc<Series> {
        if let Some(series) = self.read().series.get(&key.packed()) {
            return Arc::clone(series);
        }
        // A new series: its attributes built and the histogram bound to them outside the
        // ledger's lock, as every call into the SDK is (a collection calls back into the
        // ledger). Two requests racing here bind twice; the second binding is dropped.
        let route = self.read().names[key.route as usize].to_string();
        let mut attributes = vec![
            KeyValue::new("http.request.method", METHODS[usize::from(key.method)]),
            KeyValue::new("http.route", route),
        ];
        if key.status != 0 {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(key.status),
            ));
        }
        let series = Series {
            allocated_histogram: self.instruments.bind(&attributes),
            attributes,
            requests: AtomicU64::new(0),
            allocated: AtomicU64::new(0),
            kept: AtomicI64::new(0),
        };
        let mut book = self.write();
        Arc::clone(
            book.series
                .entry(key.packed())
                .or_insert_with(|| Arc::new(series)),
        )
    }

    /// The `n` routes (with their method) that allocated the most, with what they kept.
    pub(crate) fn top_routes(&self, n: usize) -> Vec<RouteFigures> {
        let book = self.read();
        let mut routes: HashMap<(u8, u32), RouteFigures> = HashMap::new();
        for (&packed, series) in &book.series {
            let (route, method) = ((packed >> 32) as u32, (packed >> 16) as u8);
            let figures = routes
                .entry((method, route))
                .or_insert_with(|| RouteFigures {
                    method: METHODS[usize::from(method)].to_owned(),
                    route: book.names[route as usize].to_string(),
                    requests: 0,
                    allocated_bytes: 0,
                    kept_bytes: 0,
                });
            figures.requests += series.requests.load(Relaxed);
            figures.allocated_bytes += series.allocated.load(Relaxed);
            figures.kept_bytes += series.kept.load(Relaxed);
        }
        let mut routes: Vec<_> = routes.into_values().collect();
        routes.sort_by(|a, b| {
            b.allocated_bytes
                .cmp(&a.allocated_bytes)
                .then_with(|| a.route.cmp(&b.route))
                .then_with(|| a.method.cmp(&b.method))
        });
        routes.truncate(n);
        routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_named_as_the_conventions_list_them() {
        for (index, method) in KNOWN_METHODS.iter().enumerate() {
            assert_eq!(METHODS[usize::from(method_index(method))], method.as_str());
            assert_eq!(usize::from(method_index(method)), index);
        }
        let other = Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(METHODS[usize::from(method_index(&other))], "_OTHER");
    }
}
