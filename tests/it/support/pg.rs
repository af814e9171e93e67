//! Where the tests' PostgreSQL comes from.
//!
//! - `BOS_TEST_INFRA=containers`: a PostgreSQL container (testcontainers; needs
//!   a Docker engine), one per test run.
//! - Otherwise the server at `DATABASE_URL` (default 127.0.0.1:5432/test) when
//!   it answers.
//! - Otherwise, when PostgreSQL's server binaries are installed, a throwaway
//!   cluster under `target/`, started once for the run (as the `postgres` user
//!   when running as root: `initdb` refuses root) and stopped when the test
//!   process exits.
//!
//! Each test gets a fresh database of its own on that server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sqlx::{Connection, Executor, PgPool};
use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};
use tokio::sync::OnceCell;
use uuid::Uuid;

pub fn containers() -> bool {
    std::env::var("BOS_TEST_INFRA").is_ok_and(|v| v.eq_ignore_ascii_case("containers"))
}

static SERVER: OnceCell<String> = OnceCell::const_new();
static CONTAINER: OnceCell<ContainerAsync<Postgres>> = OnceCell::const_new();
static THROWAWAY: std::sync::OnceLock<PgCluster> = std::sync::OnceLock::new();

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn answers(url: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(3), sqlx::PgConnection::connect(url)).await,
        Ok(Ok(_))
    )
}

/// The server URL fresh databases are created on.
pub async fn server_url() -> String {
    SERVER
        .get_or_init(|| async {
            if containers() {
                let container = CONTAINER
                    .get_or_init(|| async {
                        Postgres::default()
                            .with_tag("15-alpine")
                            .start()
                            .await
                            .expect("a PostgreSQL container (BOS_TEST_INFRA=containers needs a Docker engine)")
                    })
                    .await;
                let port = container.get_host_port_ipv4(5432).await.expect("mapped port");
                return format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres");
            }
            let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
            if answers(&url).await {
                return url;
            }
            let cluster = THROWAWAY.get_or_init(|| {
                let dir = target_dir().join(format!("test-pg-{}", std::process::id()));
                let cluster = PgCluster::init(&dir).unwrap_or_else(|e| {
                    panic!(
                        "no PostgreSQL answers at {url} and none could be started here ({e}); \
                         start one, set DATABASE_URL, install PostgreSQL's server \
                         (apt-get install postgresql), or set BOS_TEST_INFRA=containers"
                    )
                });
                cluster.start().expect("starting the throwaway PostgreSQL");
                cluster.stop_when_process_exits();
                cluster
            });
            cluster.url("postgres")
        })
        .await
        .clone()
}

/// The cargo target directory (where throwaway clusters live).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    )
}

/// A database of its own for one test, dropped with the guard.
pub struct Database {
    pub pool: PgPool,
    pub url: String,
    name: String,
    server: String,
}

impl Database {
    pub async fn fresh() -> Self {
        Self::fresh_on(&server_url().await).await
    }

    pub async fn fresh_on(server: &str) -> Self {
        let name = format!("bos_test_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(server)
            .await
            .expect("PostgreSQL reachable");
        admin
            .execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .unwrap();
        let url = with_database(server, &name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .connect(&url)
            .await
            .unwrap();
        Self {
            pool,
            url,
            name,
            server: server.to_owned(),
        }
    }
}

/// `url` pointing at database `name` instead.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        self.pool.close_event();
        // Drop runs outside async: a short-lived runtime of its own does the cleanup.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&server).await {
                    let _ = admin
                        .execute(
                            format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str(),
                        )
                        .await;
                }
            });
        })
        .join();
    }
}

/// A PostgreSQL cluster of a test's own (`initdb` + `pg_ctl`): the fresh-clone
/// fallback, and what the fault tests stop and start.
#[derive(Debug)]
pub struct PgCluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    /// Run the server binaries as this user (root cannot run them).
    user: Option<&'static str>,
}

fn server_binaries() -> Result<PathBuf, String> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let candidates = from_pg_config.into_iter().chain(
        std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin")),
    );
    for dir in candidates {
        if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
            return Ok(dir);
        }
    }
    Err("PostgreSQL's server binaries (initdb, pg_ctl) are not installed".to_owned())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(54_329, |a| a.port())
}

impl PgCluster {
    /// `initdb` into `dir` (removed first), on a free port.
    pub fn init(dir: &Path) -> Result<Self, String> {
        let bin = server_binaries()?;
        let user = is_root().then_some("postgres");
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let cluster = Self {
            dir: dir.to_path_buf(),
            port: free_port(),
            bin,
            user,
        };
        if let Some(user) = user {
            let status = Command::new("chown")
                .args(["-R", user])
                .arg(dir)
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("chown {user} {}", dir.display()));
            }
        }
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data().to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let path = self.bin.join(program);
        let output = match self.user {
            Some(user) => Command::new("runuser")
                .args(["-u", user, "--"])
                .arg(&path)
                .args(args)
                .output(),
            None => Command::new(&path).args(args).output(),
        }
        .map_err(|e| format!("{program}: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    pub fn start(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-o",
                &options,
                "-l",
                &self.dir.join("server.log").to_string_lossy(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// Stops the server at once (`-m immediate`: like a crash).
    pub fn stop(&self) -> Result<(), String> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A watchdog that stops the server and removes its files once this process is gone.
    pub fn stop_when_process_exits(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = match self.user {
            Some(user) => format!(
                "runuser -u {user} -- {} -D {} -m immediate stop",
                pg_ctl.display(),
                self.data().display()
            ),
            None => format!(
                "{} -D {} -m immediate stop",
                pg_ctl.display(),
                self.data().display()
            ),
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
