//! [`S3Backend`] against a real S3 server: moto's `moto_server` from the test venv
//! (`$OPENIMS_VENV`, default `~/.cache/openims-venv`, made by `scripts/setup-test-env.sh`) on a
//! free loopback port. Skipped with a message when the venv has no `moto_server`.
//!
//! Checks the [`Backend`] contract (the same one `LocalBackend` and `MemBackend` keep), that it
//! works from a plain thread, a `spawn_blocking` thread and directly inside an async task, and
//! a store ingest + read + fsck + GC round trip on it.

use openims_store::{Backend, S3Backend, Store, StoreConfig};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn venv() -> PathBuf {
    std::env::var_os("OPENIMS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/openims-venv")
        })
}

fn moto(bucket: &str) -> Option<Moto> {
    let bin = venv().join("bin/moto_server");
    if !bin.exists() {
        eprintln!(
            "{} not found (run scripts/setup-test-env.sh); skipped",
            bin.display()
        );
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts");
    let endpoint = format!("http://127.0.0.1:{port}");
    let m = Moto { child, endpoint };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server not listening");
        std::thread::sleep(Duration::from_millis(100));
    }
    let py = format!(
        "import boto3; boto3.client('s3', endpoint_url='{}', aws_access_key_id='k', \
         aws_secret_access_key='s', region_name='us-east-1').create_bucket(Bucket='{bucket}')",
        m.endpoint
    );
    let ok = Command::new(venv().join("bin/python"))
        .args(["-c", &py])
        .status()
        .expect("python runs");
    assert!(ok.success(), "bucket creation failed");
    Some(m)
}

fn url(m: &Moto, bucket: &str, prefix: &str) -> String {
    format!(
        "s3://{bucket}/{prefix}?endpoint={}&region=us-east-1&access_key_id=k&secret_access_key=s",
        m.endpoint
    )
}

fn contract(b: &dyn Backend) {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
    b.put("chunks/aa/bb/one", &data).unwrap();
    b.put("chunks/aa/cc/two", b"two").unwrap();
    b.put("manifests/m1", b"manifest").unwrap();
    assert_eq!(b.get("chunks/aa/bb/one").unwrap(), data);
    assert_eq!(
        b.get_range("chunks/aa/bb/one", 10, 20).unwrap(),
        &data[10..30]
    );
    assert_eq!(
        b.get_range("chunks/aa/bb/one", 99_990, 100).unwrap(),
        &data[99_990..]
    );
    assert!(b
        .get_range("chunks/aa/bb/one", 100_000, 10)
        .unwrap()
        .is_empty());
    assert!(b
        .get_range("chunks/aa/bb/one", 200_000, 10)
        .unwrap()
        .is_empty());
    assert!(b.get("chunks/none").unwrap_err().is_not_found());
    assert!(b.get_range("chunks/none", 0, 1).unwrap_err().is_not_found());
    assert!(b.exists("manifests/m1").unwrap());
    assert!(!b.exists("manifests/none").unwrap());
    let h = b.head("chunks/aa/bb/one").unwrap().unwrap();
    assert_eq!((h.key.as_str(), h.size), ("chunks/aa/bb/one", 100_000));
    assert!(b.head("chunks/none").unwrap().is_none());
    assert!(b.put("../escape", b"x").is_err(), "keys are validated");

    let mut keys: Vec<String> = b.list("chunks/").unwrap().map(|m| m.unwrap().key).collect();
    keys.sort();
    assert_eq!(keys, ["chunks/aa/bb/one", "chunks/aa/cc/two"]);
    let keys: Vec<String> = b
        .list("chunks/aa/b")
        .unwrap()
        .map(|m| m.unwrap().key)
        .collect();
    assert_eq!(keys, ["chunks/aa/bb/one"]);
    assert_eq!(b.list("manifests/").unwrap().count(), 1);

    // touch refreshes the modification time (S3 keeps whole seconds) and keeps the bytes.
    std::thread::sleep(Duration::from_millis(2200));
    let cutoff = SystemTime::now() - Duration::from_millis(500);
    assert!(b.touch("chunks/aa/bb/one").unwrap());
    assert!(!b.touch("chunks/none").unwrap());
    assert_eq!(b.get("chunks/aa/bb/one").unwrap(), data);
    assert_eq!(
        b.delete_if_older("chunks/aa/bb/one", cutoff).unwrap(),
        None,
        "touched: kept"
    );
    assert_eq!(
        b.delete_if_older("chunks/aa/cc/two", cutoff).unwrap(),
        Some(3),
        "old: deleted"
    );
    assert!(!b.exists("chunks/aa/cc/two").unwrap());
    assert_eq!(b.delete_if_older("chunks/none", cutoff).unwrap(), None);
    assert!(b.delete("manifests/m1").unwrap());
    assert!(!b.delete("manifests/m1").unwrap());
    b.sync().unwrap();
    // No scratch objects of touch are left under the store's prefixes.
    assert_eq!(b.list("").unwrap().count(), 1);
}

#[test]
fn s3_backend_keeps_the_backend_contract_from_any_thread() {
    let Some(m) = moto("contract") else { return };
    let b = Arc::new(S3Backend::open_url(&url(&m, "contract", "plain")).unwrap());
    contract(b.as_ref());

    // From a runtime: a spawn_blocking thread and directly on an async worker.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let b2 = Arc::new(S3Backend::open_url(&url(&m, "contract", "rt")).unwrap());
    let b3 = b2.clone();
    rt.block_on(async move {
        tokio::task::spawn_blocking(move || contract(b3.as_ref()))
            .await
            .unwrap();
        b2.put("chunks/x", b"async").unwrap();
        assert_eq!(b2.get("chunks/x").unwrap(), b"async");
    });
    drop(rt);

    assert!(S3Backend::open_url(&url(&m, "no-such-bucket", "")).is_err());
    assert!(S3Backend::open_url("s3://b?bogus=1").is_err());
    assert!(S3Backend::open_url("file:///tmp").is_err());
}

#[test]
fn store_round_trip_fsck_and_gc_on_s3() {
    let Some(m) = moto("store") else { return };
    let b = Arc::new(S3Backend::open_url(&url(&m, "store", "data")).unwrap());
    let store = Store::open_shared(b.clone(), StoreConfig::default()).unwrap();
    let bytes: Vec<u8> = (0..(9u32 << 20) + 123)
        .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
        .collect();
    let len = bytes.len() as u64;
    let mut disk =
        openims_format::read::open(Arc::new(bytes.clone()), openims_format::DiskFormat::Raw)
            .unwrap();
    let report = store.ingest(disk.as_mut(), &mut |_| {}).unwrap();
    let id = report.manifest_id;
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut store.stream_raw(&id).unwrap(), &mut back).unwrap();
    assert_eq!(back.len() as u64, len);
    assert!(back == bytes, "read back differs");
    let fsck = store.fsck(&[id]).unwrap();
    assert!(
        fsck.is_clean() && fsck.chunks_checked == 3 && fsck.orphan_chunks.is_empty(),
        "{fsck:?}"
    );
    // Live: nothing goes. Unreferenced but young: nothing goes. No grace: all goes.
    let gc = store.gc(&[id], Duration::from_secs(0)).unwrap();
    assert_eq!(gc.chunks_deleted, 0);
    let gc = store.gc(&[], Duration::from_secs(3600)).unwrap();
    assert_eq!(gc.chunks_deleted, 0);
    std::thread::sleep(Duration::from_millis(2100));
    let gc = store.gc(&[], Duration::from_secs(0)).unwrap();
    assert_eq!((gc.chunks_deleted, gc.manifests_deleted), (3, 1), "{gc:?}");
    // Only the pass's sweep marker is left (S3 has no conditional delete; see `gc`).
    let left: Vec<String> = b.list("").unwrap().map(|m| m.unwrap().key).collect();
    assert!(
        left.len() == 1 && left[0].starts_with("gc/sweep-"),
        "{left:?}"
    );
}
