//! Building this compiles all of pg-idempotency (every feature), `query!` macros included.

fn main() {
    println!("{} migration(s)", pg_idempotency::MIGRATOR.iter().count());
}
