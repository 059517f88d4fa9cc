//! Fault injection for the tests: stop the service at a phased request's boundary.
//!
//! pg-idempotency marks each boundary of a phased request with a tracing event (target
//! `pg_idempotency::phased::boundary`, fields `step` and `boundary`). With
//! `PAYMENTS_PAUSE_AT=<step>:<boundary>`, this layer prints `paused at <step>:<boundary>`
//! on stdout when the first such event arrives and blocks the thread that emitted it, for
//! `PAYMENTS_PAUSE_SECS` seconds or until the process is killed, so that a test can
//! SIGKILL (or SIGSTOP) the service exactly there.

use std::fmt::Debug;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context as LayerContext;

const TARGET: &str = "pg_idempotency::phased::boundary";

/// The layer that `PAYMENTS_PAUSE_AT` asks for, if any.
pub fn from_env() -> Result<Option<Pause>> {
    let Ok(at) = std::env::var("PAYMENTS_PAUSE_AT") else {
        return Ok(None);
    };
    let (step, boundary) = at
        .split_once(':')
        .context("PAYMENTS_PAUSE_AT must be <step>:<boundary>")?;
    let pause = match std::env::var("PAYMENTS_PAUSE_SECS") {
        Ok(secs) => Some(Duration::from_secs(
            secs.parse()
                .context("PAYMENTS_PAUSE_SECS must be a number")?,
        )),
        Err(_) => None,
    };
    Ok(Some(Pause {
        step: step.to_owned(),
        boundary: boundary.to_owned(),
        pause,
        done: AtomicBool::new(false),
    }))
}

/// Stops at one boundary, once.
pub struct Pause {
    step: String,
    boundary: String,
    /// How long; `None`: until killed.
    pause: Option<Duration>,
    done: AtomicBool,
}

#[derive(Default)]
struct Fields {
    step: String,
    boundary: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "step" => self.step = value.to_owned(),
            "boundary" => self.boundary = value.to_owned(),
            _ => {}
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn Debug) {}
}

impl<S: Subscriber> Layer<S> for Pause {
    fn on_event(&self, event: &Event<'_>, _ctx: LayerContext<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.step != self.step
            || fields.boundary != self.boundary
            || self.done.swap(true, Ordering::SeqCst)
        {
            return;
        }
        println!("paused at {}:{}", self.step, self.boundary);
        let _ = std::io::stdout().flush();
        match self.pause {
            Some(pause) => std::thread::sleep(pause),
            None => loop {
                std::thread::park();
            },
        }
    }
}
