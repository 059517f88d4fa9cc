//! Where the test setup reads its settings: the process environment, or a fake one in
//! tests.

/// Reads a setting; the real one is [`process_env`], tests pass their own.
pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, with empty values treated as unset.
pub(super) fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// A fake environment for tests (the real one cannot be changed without `unsafe`).
#[cfg(test)]
pub(super) fn test_env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |k: &str| map.get(k).cloned()
}
