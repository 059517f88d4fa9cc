//! Any bytes as an `Idempotency-Key` header value or a scope: never a panic, and what is
//! accepted is canonical and re-parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pg_idempotency::{IdempotencyKey, KeyPolicy, Scope};

fuzz_target!(|data: &[u8]| {
    for policy in [KeyPolicy::UuidV4, KeyPolicy::Opaque] {
        match IdempotencyKey::parse_bytes(data, policy) {
            Ok(key) => {
                let again =
                    IdempotencyKey::parse(key.as_str(), policy).expect("accepted keys re-parse");
                assert_eq!(again, key);
                if policy == KeyPolicy::UuidV4 {
                    assert_eq!(key.as_str(), key.as_str().to_ascii_lowercase());
                }
            }
            Err(error) => assert!(error.to_string().len() < 512, "error messages stay short"),
        }
    }
    if let Ok(scope) = Scope::from_bytes(data) {
        assert!(!scope.as_str().chars().any(char::is_control));
        assert!((1..=255).contains(&scope.as_str().len()));
    }
});
