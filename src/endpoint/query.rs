//! Reading a parameter from a request's query string.

/// The raw value of the first `name=value` pair of `query` (no percent-decoding: the values
/// this crate accepts are plain words). A bare `name` counts as an empty value.
pub(crate) fn param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::param;

    #[test]
    fn first_pair_wins() {
        assert_eq!(param(None, "mode"), None);
        assert_eq!(param(Some(""), "mode"), None);
        assert_eq!(param(Some("a=1&mode=x&mode=y"), "mode"), Some("x"));
        assert_eq!(param(Some("mode"), "mode"), Some(""));
        assert_eq!(param(Some("modes=x"), "mode"), None);
    }
}
