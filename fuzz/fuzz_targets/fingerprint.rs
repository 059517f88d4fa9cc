//! Any bytes as a request body: the fingerprint never panics or overflows the stack, is
//! deterministic, and a JSON body with other surrounding whitespace fingerprints the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pg_idempotency::{Fingerprint, IdempotentRequest};

fuzz_target!(|data: &[u8]| {
    let request = IdempotentRequest::new("POST", "/v1/payments", data);
    let fingerprint = request.fingerprint();
    assert_eq!(fingerprint, request.fingerprint(), "deterministic");
    assert_eq!(
        request.fingerprint_at(Fingerprint::CURRENT_VERSION),
        Some(fingerprint)
    );
    // The earlier version still hashes (rows stored under it keep answering retries).
    assert_eq!(request.fingerprint_at(1), request.fingerprint_at(1), "deterministic v1");
    assert!(request.fingerprint_at(1).is_some());

    // Whatever serde_json accepts (shallow enough for both parsers' depth limits) is JSON
    // to the fingerprint too, so surrounding whitespace must not change it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let shallow = text.bytes().filter(|b| matches!(b, b'[' | b'{')).count() < 100;
    if shallow && serde_json::from_str::<serde_json::Value>(text).is_ok() {
        let padded = format!(" \n{text}\t ");
        assert_eq!(
            IdempotentRequest::new("POST", "/v1/payments", padded.as_bytes()).fingerprint(),
            fingerprint
        );
    }
});
