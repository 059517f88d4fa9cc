//! The examples as real processes: built once, started with flags and environment, their
//! printed port read, signalled.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A running example's stdout, line by line.
pub type Stdout = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// The binary of example `name`. `cargo test` has built it already (it builds
/// examples); running `cargo build --example NAME` once more is then a quick no-op, and
/// makes sure that a test never runs a stale binary.
pub fn example_binary(name: &str) -> Result<PathBuf> {
    /// Each example built so far: its name and binary (or why the build failed).
    type Built = Vec<(String, Result<PathBuf, String>)>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, binary)) = built.iter().find(|(built, _)| built == name) {
        return binary.clone().map_err(anyhow::Error::msg);
    }
    let binary = build_example(name).map_err(|e| format!("{e:#}"));
    built.push((name.to_owned(), binary.clone()));
    binary.map_err(anyhow::Error::msg)
}

fn build_example(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("no target directory")?;
    let mut build = std::process::Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "--example", name, "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    // The variables cargo sets for this test crate: build scripts that track them (ring's
    // tracks CARGO_MANIFEST_DIR) would otherwise see a change and rebuild.
    for (var, _) in std::env::vars_os() {
        let var = var.to_string_lossy();
        if var.starts_with("CARGO_PKG_")
            || var.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_MANIFEST_LINKS",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&var.as_ref())
        {
            build.env_remove(var.as_ref());
        }
    }
    let status = build.status()?;
    ensure!(status.success(), "building the {name} example failed");
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    ensure!(binary.exists(), "no {}", binary.display());
    Ok(binary)
}

/// Example `name`, started with `env` and `args` (and without `DATABASE_URL`); returns
/// the child, the port it printed, and the rest of its stdout.
pub async fn spawn_example(
    name: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> Result<(tokio::process::Child, u16, Stdout)> {
    let mut child = tokio::process::Command::new(example_binary(name)?)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .context("no line on stdout in 60 s")??
        .context("stdout closed")?;
    let port = line
        .strip_prefix("listening on http://127.0.0.1:")
        .with_context(|| format!("unexpected line {line:?}"))?
        .parse()?;
    Ok((child, port, lines))
}

/// Sends `signal` (`-KILL`, `-TERM`, `-STOP`, `-CONT`, ...) to `child`.
pub async fn signal(child: &tokio::process::Child, signal: &str) -> Result<()> {
    let pid = child.id().context("no pid: the process has exited")?;
    let sent = tokio::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .await?;
    ensure!(sent.success(), "kill {signal} {pid} failed");
    Ok(())
}

/// Sends `signal` to `child` and waits (at most 30 s) for it to exit.
pub async fn stop_with(
    child: &mut tokio::process::Child,
    signal_name: &str,
) -> Result<std::process::ExitStatus> {
    signal(child, signal_name).await?;
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("did not stop within 30 s")?
        .map_err(Into::into)
}
