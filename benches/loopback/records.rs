//! The allocation-heavy work the profiling figures measure, shared by the `loopback` and
//! `allocations` benches.

/// 500 records built as `serde_json::Value`s (a map, two strings and an array each) and
/// rendered to a JSON string, as an API handler does: about 478 KiB allocated in a few
/// thousand allocations.
pub(crate) fn records() -> String {
    let items: Vec<serde_json::Value> = (0..500)
        .map(|i| {
            serde_json::json!({
                "id": i,
                "name": format!("item-{i}"),
                "tags": ["a", "b", format!("t{}", i % 7)],
            })
        })
        .collect();
    serde_json::to_string(&items).unwrap()
}
