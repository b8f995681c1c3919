use std::sync::Arc;

use super::*;

struct Echo;

#[async_trait::async_trait]
impl Handler for Echo {
    async fn handle(&self, req: Request, progress: Progress) -> Result<serde_json::Value, String> {
        match req {
            Request::Ping => {
                for i in 0..3 {
                    progress.update(i, 3, "steps", "working");
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                Ok(serde_json::json!({"pong": true}))
            }
            // Every other operation is refused by this test handler.
            _ => Err("no status here; use ping".into()),
        }
    }
}

async fn start(
    allow: Option<Vec<u32>>,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    tokio::sync::oneshot::Sender<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ear.admin.sock");
    let listener = bind(&path, 0o600).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run(
        listener,
        ControlConfig { allow_uids: allow },
        Arc::new(Echo),
        async {
            let _ = rx.await;
        },
    ));
    (dir, path, tx)
}

#[test]
fn default_path_sits_beside_the_data_socket() {
    assert_eq!(
        default_path(Path::new("/run/ear/ear.sock")),
        Path::new("/run/ear/ear.admin.sock")
    );
    assert_eq!(default_path(Path::new("nbd")), Path::new("nbd.admin.sock"));
}

#[test]
fn reply_lines_are_tagged_objects() {
    let r = serde_json::to_string(&Reply::Error("x".into())).unwrap();
    assert_eq!(r, r#"{"error":"x"}"#);
    let q: Request = serde_json::from_str(r#"{"op":"ping"}"#).unwrap();
    assert_eq!(q, Request::Ping);
    assert!(serde_json::from_str::<Request>(r#"{"op":"format-disk"}"#).is_err());
}

#[tokio::test]
async fn request_streams_progress_then_answers() {
    let (_d, path, _stop) = start(None).await;
    let mut seen = 0;
    let v = client::call(&path, &Request::Ping, |_| seen += 1)
        .await
        .unwrap();
    assert_eq!(v["pong"], true);
    assert!(seen >= 1, "no progress line arrived");
    let e = client::call(&path, &Request::Status, |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "no status here; use ping");
}

#[tokio::test]
async fn peer_outside_the_allowlist_is_refused() {
    let me = rustix::process::getuid().as_raw();
    let (_d, path, _stop) = start(Some(vec![me.wrapping_add(1)])).await;
    let e = client::call(&path, &Request::Ping, |_| {})
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("peer uid {me} is not allowed")),
        "{e}"
    );
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_one_line() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_d, path, _stop) = start(None).await;
    for req in [
        b"{\"op\":\"nope\"}\n".to_vec(),
        vec![b'x'; MAX_REQUEST_LINE + 10],
    ] {
        let mut s = UnixStream::connect(&path).await.unwrap();
        let _ = s.write_all(&req).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        let reply: Reply = serde_json::from_str(out.trim_end()).unwrap();
        assert!(matches!(reply, Reply::Error(_)), "{out}");
        assert_eq!(out.lines().count(), 1);
    }
    // Still serving.
    client::call(&path, &Request::Ping, |_| {}).await.unwrap();
}

#[test]
fn no_caller_means_no_cost() {
    let p = Progress::detached();
    p.update(1, 2, "blocks", "x");
}
