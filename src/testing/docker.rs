//! Step 2 of the module documentation: a postgres container through testcontainers.
//!
//! Everything here goes through testcontainers' own Docker client, so the daemon is found the
//! way testcontainers finds it. The container is removed by the daemon itself: it is created
//! with `AutoRemove`, and a "lifeline" shell runs in it (`docker exec`) reading a stdin that
//! this process holds open; when this process ends, however it ends, the daemon closes that
//! stdin, the shell stops the server, and the stopped container is removed with its volume.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::Connection;
use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::bollard::Docker;
use testcontainers_modules::testcontainers::bollard::exec::StartExecResults;
use testcontainers_modules::testcontainers::bollard::models::ExecConfig;
use testcontainers_modules::testcontainers::bollard::query_parameters::{
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use testcontainers_modules::testcontainers::core::client::docker_client_instance;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};

use super::env::Env;

/// How long the daemon may take to answer `GET /_ping`.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// How long pulling a missing image may take, unless `PG_TEST_PULL_TIMEOUT` says otherwise.
const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the started container may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The image unless `PG_TEST_IMAGE` (or `PG_TEST_IMAGE_TAG`) says otherwise. `DROP DATABASE
/// ... WITH (FORCE)` needs PostgreSQL 13 or later, so testcontainers' own default (11) won't do.
const DEFAULT_IMAGE: &str = "postgres:17-alpine";

/// The label that marks this process's container, to find it when its start fails half-way.
const LABEL: &str = "pg-idempotency.test-run";

/// Stops the server (PID 1) once stdin closes. It repeats until PID 1 is postgres, which is
/// not yet the case while the image's entrypoint initializes the cluster.
const LIFELINE: &str = "read _ignored; while kill -QUIT 1; do sleep 1; done";

/// The image to run: `PG_TEST_IMAGE` (a whole reference, such as
/// `mirror.example:5000/library/postgres:17-alpine`), else `postgres:PG_TEST_IMAGE_TAG`, else
/// [`DEFAULT_IMAGE`]. Returns the name and the tag (`latest` when none is given).
pub(super) fn image(env: Env<'_>) -> (String, String) {
    let reference = env("PG_TEST_IMAGE")
        .or_else(|| env("PG_TEST_IMAGE_TAG").map(|tag| format!("postgres:{tag}")))
        .unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
    // The tag follows the last `:` after the last `/` (a `:` before it belongs to a registry's
    // port). testcontainers joins name and tag with `:`, so `name@sha256:digest` also works.
    let name_start = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[name_start..].rfind(':') {
        Some(i) => (
            reference[..name_start + i].to_owned(),
            reference[name_start + i + 1..].to_owned(),
        ),
        None => (reference, "latest".to_owned()),
    }
}

/// Starts a postgres container (trust authentication, fsync off, 200 connections) that lives
/// as long as this process, and returns the URL of its maintenance database. `Err` says why
/// Docker was not used, for the line that tells which server the tests got.
pub(super) fn start(env: Env<'_>) -> Result<String, String> {
    if let Some(v) = env("PG_TEST_DOCKER")
        && matches!(
            v.to_ascii_lowercase().as_str(),
            "0" | "false" | "no" | "off"
        )
    {
        return Err(format!("Docker skipped (PG_TEST_DOCKER={v})"));
    }
    let (name, tag) = image(env);
    let pull_timeout = env("PG_TEST_PULL_TIMEOUT")
        .and_then(|s| s.parse().ok())
        .map_or(DEFAULT_PULL_TIMEOUT, Duration::from_secs);
    let host = env("DOCKER_HOST").unwrap_or_else(|| "the default socket".to_owned());

    // The container and the streams of its lifeline belong to a runtime of their own, on a
    // thread that keeps them for the life of the process, whatever runtime the caller has.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("pg-idempotency-container".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return drop(tx.send(Err(format!("cannot build a tokio runtime: {e}")))),
            };
            runtime.block_on(async move {
                match run(&name, &tag, &host, pull_timeout).await {
                    Ok((url, keep)) => {
                        let _ = tx.send(Ok(url));
                        let _keep = keep;
                        std::future::pending::<()>().await;
                    }
                    Err(e) => drop(tx.send(Err(e))),
                }
            });
        })
        .map_err(|e| format!("cannot spawn a thread for Docker: {e}"))?;
    rx.recv()
        .map_err(|_| "testcontainers panicked (see above); Docker not used".to_owned())?
}

/// What keeps the container: its handle and the two ends of its lifeline.
type Keep = (ContainerAsync<Postgres>, StartExecResults);

async fn run(
    name: &str,
    tag: &str,
    host: &str,
    pull_timeout: Duration,
) -> Result<(String, Keep), String> {
    let image = format!("{name}:{tag}");
    let docker = docker_client_instance()
        .await
        .map_err(|e| format!("no Docker daemon ({e})"))?;
    match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("no Docker daemon at {host} ({e})")),
        Err(_) => {
            return Err(format!(
                "no Docker daemon answers at {host} within {} s",
                PING_TIMEOUT.as_secs()
            ));
        }
    }

    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut request = Postgres::default()
        .with_host_auth()
        .with_name(name)
        .with_tag(tag)
        .with_cmd(["-c", "fsync=off", "-c", "max_connections=200"])
        .with_label(LABEL, &run_id)
        .with_host_config_modifier(|config| config.auto_remove = Some(true))
        // Readiness is awaited below, once the lifeline is in place.
        .with_ready_conditions(Vec::new())
        .with_startup_timeout(Duration::from_secs(60));
    // Pull only a missing image, and not for longer than the pull timeout: cancelling a pull
    // leaves nothing behind. (testcontainers would pull, without a bound, when creating.)
    if docker.inspect_image(&image).await.is_err() {
        request = tokio::time::timeout(pull_timeout, request.pull_image())
            .await
            .map_err(|_| {
                format!(
                    "Docker answers, but pulling {image} took over {} s (PG_TEST_PULL_TIMEOUT)",
                    pull_timeout.as_secs()
                )
            })?
            .map_err(|e| format!("Docker answers, but {e}"))?;
    }
    let container = match request.start().await {
        Ok(container) => container,
        Err(e) => {
            remove_labelled(&docker, &run_id).await;
            return Err(format!("Docker answers, but {image} did not start: {e}"));
        }
    };
    match lifeline_and_url(&docker, &container).await {
        Ok((lifeline, url)) => Ok((url, (container, lifeline))),
        Err(e) => {
            let _ = container.rm().await;
            Err(format!("Docker answers, but {image} did not come up: {e}"))
        }
    }
}

/// Starts the lifeline, then waits until the server accepts connections.
async fn lifeline_and_url(
    docker: &Docker,
    container: &ContainerAsync<Postgres>,
) -> Result<(StartExecResults, String), String> {
    let exec = docker
        .create_exec(
            container.id(),
            ExecConfig {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                cmd: Some(vec!["sh".into(), "-c".into(), LIFELINE.into()]),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("cannot create its lifeline: {e}"))?;
    let lifeline = docker
        .start_exec(&exec.id, None)
        .await
        .map_err(|e| format!("cannot start its lifeline: {e}"))?;

    let host = container.get_host().await.map_err(|e| e.to_string())?;
    let port = container
        .get_host_port_ipv4(5432)
        .await
        .map_err(|e| e.to_string())?;
    let url = format!("postgres://postgres@{host}:{port}/postgres");
    // The entrypoint's first, initializing server listens on no TCP port, so the first
    // connection that works is to the real server.
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&url));
        if let Ok(Ok(conn)) = attempt.await {
            let _ = conn.close().await;
            return Ok((lifeline, url));
        }
        if !container.is_running().await.unwrap_or(false) {
            return Err("the container stopped".to_owned());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no connection within {} s",
                READY_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removes this run's container when `start` failed before handing it over.
async fn remove_labelled(docker: &Docker, run_id: &str) {
    let filters = HashMap::from([("label", vec![format!("{LABEL}={run_id}")])]);
    let list = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    for summary in docker.list_containers(Some(list)).await.unwrap_or_default() {
        if let Some(id) = summary.id {
            let rm = RemoveContainerOptionsBuilder::new()
                .force(true)
                .v(true)
                .build();
            let _ = docker.remove_container(&id, Some(rm)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::env::test_env as env_of;

    #[test]
    fn image_reference_is_parsed() {
        let image_of = |pairs: &[(&str, &str)]| image(&env_of(pairs));
        let pair = |n: &str, t: &str| (n.to_owned(), t.to_owned());
        assert_eq!(image_of(&[]), pair("postgres", "17-alpine"));
        assert_eq!(
            image_of(&[("PG_TEST_IMAGE_TAG", "16")]),
            pair("postgres", "16")
        );
        let cases = [
            ("postgres:16-alpine", pair("postgres", "16-alpine")),
            ("postgres", pair("postgres", "latest")),
            (
                "mirror.example:5000/library/postgres:17",
                pair("mirror.example:5000/library/postgres", "17"),
            ),
            (
                "mirror.example:5000/postgres",
                pair("mirror.example:5000/postgres", "latest"),
            ),
            ("postgres@sha256:abc", pair("postgres@sha256", "abc")),
        ];
        for (reference, expected) in cases {
            let both = [
                ("PG_TEST_IMAGE", reference),
                ("PG_TEST_IMAGE_TAG", "ignored"),
            ];
            assert_eq!(image_of(&both), expected, "{reference}");
        }
    }

    #[test]
    fn opt_out_skips_docker() {
        let why = start(&env_of(&[("PG_TEST_DOCKER", "off")])).unwrap_err();
        assert!(why.contains("PG_TEST_DOCKER=off"), "{why}");
    }

    /// Run only by [`a_killed_process_leaves_no_container`], in a child process.
    #[test]
    #[ignore = "run in a child process by a_killed_process_leaves_no_container"]
    fn child_holds_a_container() {
        match start(&crate::testing::env::process_env) {
            Ok(url) => println!("URL {url}"),
            Err(why) => println!("NO DOCKER {why}"),
        }
        std::thread::sleep(Duration::from_secs(600));
    }

    /// Needs a Docker daemon and the image (skipped, with a note, without them): the container
    /// is removed when the process that started it dies by SIGKILL.
    #[test]
    fn a_killed_process_leaves_no_container() {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "testing::docker::tests::child_holds_a_container"])
            .args(["--ignored", "--nocapture"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let said = lines
            .map_while(Result::ok)
            .find(|l| l.starts_with("URL ") || l.starts_with("NO DOCKER "))
            .unwrap_or_default();
        let Some(url) = said.strip_prefix("URL ") else {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("skipped: {said}");
            return;
        };
        let port: u16 = url
            .rsplit(':')
            .next()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let docker = runtime.block_on(docker_client_instance()).unwrap();
        let filters = HashMap::from([("label", vec![LABEL.to_owned()])]);
        let list = ListContainersOptionsBuilder::new()
            .filters(&filters)
            .build();
        let running = runtime
            .block_on(docker.list_containers(Some(list)))
            .unwrap();
        let id = running
            .into_iter()
            .find(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .any(|p| p.public_port == Some(port))
            })
            .and_then(|c| c.id)
            .expect("the container runs");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let t = Instant::now();
        while runtime
            .block_on(docker.inspect_container(&id, None))
            .is_ok()
        {
            assert!(t.elapsed() < Duration::from_secs(30), "{id} still there");
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!("container of {url} gone {:?} after SIGKILL", t.elapsed());
    }
}
