//! A real moto server (`moto_server`) for integration tests: started on a free
//! loopback port, waited for, killed on drop.
//!
//! If `moto_server` is not on `PATH` the tests fail with a clear message,
//! unless `EAR_SKIP_MOTO=1` is set (then [`Moto::start`] returns `None` and the
//! caller returns early).
#![allow(dead_code)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Region moto keys are created in.
pub const REGION: &str = "us-east-1";

/// A running moto server.
pub struct Moto {
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The port.
    pub port: u16,
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// A port that was free a moment ago (bind to :0 and release).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

static ENV: Once = Once::new();

/// Sets the fake credentials once for the whole test process, before any
/// test reads the environment (every test calls this first).
pub fn init_env() {
    ENV.call_once(|| {
        // Edition 2021: `set_var` is safe to call; doing it once, under the
        // Once, before any SDK client exists in this process keeps it race-free.
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_SESSION_TOKEN", "testing");
        std::env::set_var("AWS_REGION", REGION);
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::remove_var("AWS_PROFILE");
        std::env::remove_var("AWS_ENDPOINT_URL");
        std::env::remove_var("AWS_ENDPOINT_URL_KMS");
    });
}

impl Moto {
    /// Starts moto, or returns `None` when it is absent and `EAR_SKIP_MOTO=1`.
    /// Panics with a clear message when it is absent otherwise.
    pub fn start() -> Option<Moto> {
        init_env();
        if !on_path("moto_server") {
            if std::env::var("EAR_SKIP_MOTO").as_deref() == Ok("1") {
                eprintln!("moto_server not on PATH and EAR_SKIP_MOTO=1: skipping");
                return None;
            }
            panic!(
                "moto_server is not on PATH: install it with `pip install 'moto[server]'`, \
                 or set EAR_SKIP_MOTO=1 to skip the AWS KMS integration tests"
            );
        }
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn moto_server");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(Moto {
                        child: Some(child),
                        endpoint: format!("http://127.0.0.1:{port}"),
                        port,
                    });
                }
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut s) = child.stderr.take() {
                        let _ = s.read_to_string(&mut err);
                    }
                    last_err = format!("moto_server exited with {status}: {err}");
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = "moto_server did not listen within 30 s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start moto_server: {last_err}");
    }

    /// Stops the server now (to simulate a KMS outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// An admin KMS client for setting up keys (static test credentials).
    pub fn admin_client(&self) -> aws_sdk_kms::Client {
        let conf = aws_sdk_kms::Config::builder()
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .region(aws_sdk_kms::config::Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_sdk_kms::config::Credentials::new(
                "testing", "testing", None, None, "moto",
            ))
            .build();
        aws_sdk_kms::Client::from_conf(conf)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Moto {
    /// Creates a KMS key on moto (`ENCRYPT_DECRYPT` usage) and returns its ARN.
    pub async fn create_key(
        &self,
        spec: aws_sdk_kms::types::KeySpec,
        multi_region: bool,
    ) -> String {
        let out = self
            .admin_client()
            .create_key()
            .key_spec(spec)
            .key_usage(aws_sdk_kms::types::KeyUsageType::EncryptDecrypt)
            .multi_region(multi_region)
            .description("ear-sidecar test")
            .send()
            .await
            .expect("CreateKey on moto");
        out.key_metadata()
            .and_then(|m| m.arn())
            .expect("CreateKey returned an ARN")
            .to_string()
    }

    /// Enables or disables the key `arn` (an operator's EnableKey / DisableKey).
    #[allow(dead_code)] // not every test file uses it
    pub async fn set_enabled(&self, arn: &str, enabled: bool) {
        let c = self.admin_client();
        if enabled {
            c.enable_key()
                .key_id(kid(arn))
                .send()
                .await
                .expect("EnableKey");
        } else {
            c.disable_key()
                .key_id(kid(arn))
                .send()
                .await
                .expect("DisableKey");
        }
    }
}

/// The key id part of an ARN (moto's DisableKey/EnableKey/ScheduleKeyDeletion
/// fail with a 500 when given an ARN).
#[allow(dead_code)] // not every test file uses it
pub fn kid(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}
