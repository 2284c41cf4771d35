//! `weir serve` processes for the tests that need a real process boundary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use tonic::transport::Channel;

/// The `weir` binary of this build.
pub const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// The Redis the tests use (`WEIR_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`).
pub fn redis_url() -> String {
    std::env::var("WEIR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// Deletes every key under `prefix`: the keys it deleted.
pub async fn delete_prefix(prefix: &str) -> Vec<String> {
    let mut conn = weir_mesh::store::connect(&redis_url()).await.unwrap();
    let keys = weir_mesh::store::keys_matching(&mut conn, &format!("{prefix}:*"))
        .await
        .unwrap();
    for key in &keys {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    keys
}

/// Writes `text` to a config file of its own in the temporary directory (named after `name`, this
/// process and the time, so concurrent tests never share one) and returns its path.
pub fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let path =
        std::env::temp_dir().join(format!("weir-{name}-{}-{nanos}.toml", std::process::id()));
    std::fs::write(&path, text).expect("the temporary directory is writable");
    path
}

/// `weir serve <service> --config <config>` on a free port of 127.0.0.1, with no metrics
/// endpoint, no trace export and warnings only; add what a test needs before [`Serve::start`].
pub fn serve_command(service: &str, config: &Path) -> Command {
    let mut command = Command::new(WEIR);
    command
        .args(["serve", service, "--config"])
        .arg(config)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("WEIR_MESH__SECRET")
        .env("RUST_LOG", "warn")
        .env("WEIR_TELEMETRY__METRICS_LISTEN", "")
        .env("WEIR_REVIEW__CONSOLE__LISTEN", "")
        .env("WEIR_ROUTER__HTTP__LISTEN", "")
        .env(
            format!("WEIR_{}__LISTEN", service.to_ascii_uppercase()),
            "127.0.0.1:0",
        );
    command
}

/// A running `weir serve` process; killed on drop.
pub struct Serve {
    child: Child,
    /// `http://<addr>` of the service.
    pub url: String,
}

impl Serve {
    /// Spawns `command` and waits (30 s at most) for it to print `<service> grpc://<addr>`. Its
    /// stdout is read to the end on a thread of its own, so the process never writes to a closed
    /// pipe.
    pub fn start(mut command: Command, service: &str) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("weir serve starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.starts_with(service) => {
                    let addr = line.split("grpc://").nth(1).unwrap().trim().to_string();
                    return Self {
                        child,
                        url: format!("http://{addr}"),
                    };
                }
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("weir serve {service} did not print its address");
    }

    /// A channel to the service.
    pub fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect_lazy()
    }

    /// SIGKILL: the process dies at once, mid-write, as in a crash or an OOM kill.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
