//! The errors of the test setup.

use std::io;

/// Errors of the [`testing`](super) module. Each message says what to do about it.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TestServerError {
    /// No PostgreSQL server could be found or started.
    #[error(
        "no PostgreSQL server for the tests. Do one of these: set DATABASE_URL to a server \
         this user may create databases on (e.g. \
         DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/postgres); or start Docker, \
         so a postgres container can be run; or install the PostgreSQL server binaries \
         (Debian/Ubuntu: `apt-get install postgresql`, Fedora/RHEL: `dnf install \
         postgresql-server`, macOS: `brew install postgresql@17`), or set PG_BIN to the \
         directory holding initdb, pg_ctl and postgres. Looked at:{looked_at}"
    )]
    NoPostgres {
        /// Every place looked at and why it did not do, one per line.
        looked_at: String,
    },

    /// Running as root, and the user to run the server as does not exist.
    #[error(
        "running as root, and PostgreSQL refuses to run as root, but there is no \
         unprivileged user `{user}` in /etc/passwd to run it as: create one (e.g. `useradd \
         --system {user}`) or set PG_TEST_USER to an existing unprivileged user, or set \
         DATABASE_URL to use a running server"
    )]
    NoUnprivilegedUser {
        /// The user looked for (`PG_TEST_USER`, else `nobody`).
        user: String,
    },

    /// `initdb` or `pg_ctl` failed for a throwaway cluster.
    #[error(
        "`{action}` failed for a throwaway PostgreSQL cluster (to use a running server \
         instead, set DATABASE_URL): {detail}"
    )]
    Cluster {
        /// The command that failed.
        action: String,
        /// Its output and, for a start, the tail of the server log.
        detail: String,
    },

    /// `DATABASE_URL` is set but is not a postgres URL.
    #[error(
        "DATABASE_URL is set but is not a postgres:// or postgresql:// URL: set it to one, \
         e.g. postgres://postgres:postgres@127.0.0.1:5432/postgres, or unset it"
    )]
    InvalidDatabaseUrl,

    /// Something took too long.
    #[error("{what} took longer than {seconds} s: check that the server is up and reachable")]
    Timeout {
        /// What was being done.
        what: String,
        /// The limit, in seconds.
        seconds: u64,
    },

    /// An earlier call in this process failed to find or start the shared server.
    #[error(
        "the shared test server could not be found or started earlier in this process: \
         {message}"
    )]
    EarlierFailure {
        /// The earlier error's message.
        message: String,
    },

    /// The database server refused or failed a request.
    #[error("PostgreSQL error in the test setup: {0}")]
    Database(#[from] sqlx::Error),

    /// Applying this crate's migrations failed.
    #[error("applying pg-idempotency's migrations to the test database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl TestServerError {
    /// This error again, for later callers of [`TestServer::shared`]: `NoPostgres` as it is,
    /// anything else as [`TestServerError::EarlierFailure`].
    pub(super) fn replay(&self) -> TestServerError {
        match self {
            TestServerError::NoPostgres { looked_at } => TestServerError::NoPostgres {
                looked_at: looked_at.clone(),
            },
            TestServerError::EarlierFailure { message } => TestServerError::EarlierFailure {
                message: message.clone(),
            },
            other => TestServerError::EarlierFailure {
                message: other.to_string(),
            },
        }
    }

    pub(super) fn io(context: impl Into<String>, source: io::Error) -> Self {
        TestServerError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The places looked at, one per line, for [`TestServerError::NoPostgres`].
pub(super) fn format_looked_at(places: &[String]) -> String {
    places.iter().map(|p| format!("\n  - {p}")).collect()
}
