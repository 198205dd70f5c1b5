//! `openims transfer`: moves an image between two sites that cannot reach each other but can
//! both be reached from here: export at the source (IMS export job into a source bucket),
//! download the file, upload it to a target bucket (multipart), register it at the target
//! (`POST /v2/images` + `register_image`), and verify that the target's disk is the source's.
//!
//! **Resumable.** Every step records what it finished in a state file (JSON, next to the
//! downloaded file). Re-running the same command continues: an export job already started is
//! polled, not restarted; the download continues from the bytes already on disk (ranged GETs);
//! the upload lists the parts the target already has (ListParts) and sends only the others;
//! a registration already started is polled.
//!
//! **Verified end to end.** The export carries the source disk's content digest in its object
//! metadata (`x-amz-meta-openims-disk-digest`, a BLAKE3 manifest of the virtual disk); the
//! registration at the target computes the same digest from what it imported, and the two must
//! be equal. The file itself is also checked: its SHA-256 after download and after each resumed
//! upload part (part ETags are MD5s the target computed from what it received).
//!
//! The transport is a small HTTP/1.1 client over `std::net::TcpStream` (plain `http://`
//! endpoints): IMS calls are signed like the Huawei Cloud SDK (`SDK-HMAC-SHA256`), bucket
//! calls with AWS Signature Version 4.

use anyhow::{anyhow, bail, Context};
use clap::Args;
use hmac::{Hmac, Mac};
use indicatif::{ProgressBar, ProgressStyle};
use openims_api::sign;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One site: its IMS endpoint, its bucket endpoint, credentials and the bucket to use.
#[derive(Debug, Clone)]
struct Site {
    endpoint: String,
    s3_endpoint: String,
    access_key: String,
    secret_key: String,
    project_id: String,
    region: String,
    bucket: String,
}

/// `openims transfer` arguments.
#[derive(Args, Debug, Clone)]
pub struct TransferArgs {
    /// The image to move (its id at the source).
    #[arg(long)]
    pub image: String,
    /// File format of the transfer: qcow2, vhd or vmdk.
    #[arg(long, default_value = "qcow2")]
    pub format: String,
    /// Name of the image at the target (default: the source image's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Directory for the downloaded file and the state file.
    #[arg(long, default_value = ".")]
    pub work_dir: PathBuf,
    /// Keep the downloaded file (e.g. for offline media) instead of deleting it at the end.
    #[arg(long)]
    pub keep_file: bool,
    /// Size of upload parts in MiB (5-5120).
    #[arg(long, default_value_t = 16)]
    pub part_size_mib: u64,
    /// Limit download and upload to this many bytes per second (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub limit_rate: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,

    #[arg(long, env = "OPENIMS_FROM_ENDPOINT")]
    pub from_endpoint: String,
    #[arg(long, env = "OPENIMS_FROM_S3_ENDPOINT")]
    pub from_s3_endpoint: String,
    #[arg(long, env = "OPENIMS_FROM_ACCESS_KEY")]
    pub from_access_key: String,
    #[arg(long, env = "OPENIMS_FROM_SECRET_KEY", hide_env_values = true)]
    pub from_secret_key: String,
    #[arg(long, env = "OPENIMS_FROM_PROJECT_ID")]
    pub from_project_id: String,
    #[arg(long, env = "OPENIMS_FROM_REGION", default_value = "local-1")]
    pub from_region: String,
    /// Bucket at the source the export is written to (must exist).
    #[arg(long)]
    pub from_bucket: String,

    #[arg(long, env = "OPENIMS_TO_ENDPOINT")]
    pub to_endpoint: String,
    #[arg(long, env = "OPENIMS_TO_S3_ENDPOINT")]
    pub to_s3_endpoint: String,
    #[arg(long, env = "OPENIMS_TO_ACCESS_KEY")]
    pub to_access_key: String,
    #[arg(long, env = "OPENIMS_TO_SECRET_KEY", hide_env_values = true)]
    pub to_secret_key: String,
    #[arg(long, env = "OPENIMS_TO_PROJECT_ID")]
    pub to_project_id: String,
    #[arg(long, env = "OPENIMS_TO_REGION", default_value = "local-1")]
    pub to_region: String,
    /// Bucket at the target the file is uploaded to (must exist).
    #[arg(long)]
    pub to_bucket: String,
}

/// What the transfer finished so far (the state file).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    image_id: String,
    format: String,
    object: String,
    export_job: Option<String>,
    exported: bool,
    size: u64,
    digest: Option<String>,
    downloaded: bool,
    sha256: Option<String>,
    upload_id: Option<String>,
    uploaded: bool,
    target_image_id: Option<String>,
    register_job: Option<String>,
    registered: bool,
}

/// What this run did (the summary).
#[derive(Debug, Default, Serialize)]
struct Summary {
    target_image_id: String,
    bytes: u64,
    bytes_downloaded: u64,
    bytes_download_resumed: u64,
    parts_uploaded: u64,
    parts_already_uploaded: u64,
    bytes_uploaded: u64,
    sha256: String,
    disk_digest: String,
    verified: bool,
    file: Option<PathBuf>,
}

// ---- HTTP ------------------------------------------------------------------------------------

/// A response: status, lower-cased headers; the body went to the caller's writer.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A request body.
enum Body<'a> {
    None,
    Bytes(&'a [u8]),
    /// `len` bytes of a file from `offset`, throttled to `rate` bytes/s (0: unlimited).
    File(&'a File, u64, u64, u64),
}

fn host_of(endpoint: &str) -> anyhow::Result<String> {
    let rest = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// endpoints are supported, got {endpoint}"))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        bail!("endpoint must be http://HOST:PORT, got {endpoint}");
    }
    Ok(host.to_string())
}

/// Sleeps as needed so that `done` bytes since `start` do not exceed `rate` bytes/s.
fn throttle(rate: u64, start: Instant, done: u64) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(start.elapsed()) {
        std::thread::sleep(wait);
    }
}

#[allow(clippy::too_many_arguments)]
fn http(
    host: &str,
    method: &str,
    path_q: &str,
    headers: &[(String, String)],
    body: Body<'_>,
    out: &mut dyn Write,
    rate: u64,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<Resp> {
    let len = match &body {
        Body::None => 0,
        Body::Bytes(b) => b.len() as u64,
        Body::File(_, _, l, _) => *l,
    };
    let mut s = TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut req = format!("{method} {path_q} HTTP/1.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!(
        "content-length: {len}\r\nconnection: close\r\n\r\n"
    ));
    s.write_all(req.as_bytes())?;
    match body {
        Body::None => {}
        Body::Bytes(b) => s.write_all(b)?,
        Body::File(f, offset, len, rate) => {
            let mut f = f.try_clone()?;
            f.seek(SeekFrom::Start(offset))?;
            let mut left = len;
            let mut buf = vec![0u8; 256 << 10];
            let start = Instant::now();
            while left > 0 {
                let n = (buf.len() as u64).min(left) as usize;
                f.read_exact(&mut buf[..n])?;
                s.write_all(&buf[..n])?;
                left -= n as u64;
                progress(n as u64);
                throttle(rate, start, len - left);
            }
        }
    }
    let mut r = BufReader::with_capacity(256 << 10, s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status line {line:?}"))?;
    let mut hs = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            hs.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let resp = Resp {
        status,
        headers: hs,
    };
    if method == "HEAD" {
        return Ok(resp);
    }
    let start = Instant::now();
    let mut got = 0u64;
    let mut copy = |r: &mut dyn Read, n: Option<u64>| -> anyhow::Result<()> {
        let mut buf = vec![0u8; 256 << 10];
        let mut left = n;
        loop {
            let want = left.map_or(buf.len(), |l| (l as usize).min(buf.len()));
            if want == 0 {
                return Ok(());
            }
            let k = r.read(&mut buf[..want])?;
            if k == 0 {
                return match left {
                    Some(l) if l > 0 => Err(anyhow!("connection closed {l} bytes early")),
                    _ => Ok(()),
                };
            }
            out.write_all(&buf[..k])?;
            got += k as u64;
            progress(k as u64);
            if let Some(l) = &mut left {
                *l -= k as u64;
            }
            if status < 300 {
                throttle(rate, start, got);
            }
        }
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| anyhow!("bad chunk size {line:?}"))?;
            if size == 0 {
                break;
            }
            copy(&mut r, Some(size))?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = resp.header("content-length") {
        copy(&mut r, Some(n.parse()?))?;
    } else {
        copy(&mut r, None)?;
    }
    Ok(resp)
}

// ---- IMS (SDK-HMAC-SHA256) -------------------------------------------------------------------

fn sdk_date() -> anyhow::Result<String> {
    let f = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    Ok(time::OffsetDateTime::now_utc().format(&f)?)
}

fn ims(site: &Site, method: &str, path_q: &str, body: Option<&Value>) -> anyhow::Result<Value> {
    let host = host_of(&site.endpoint)?;
    let (path, query) = path_q.split_once('?').unwrap_or((path_q, ""));
    let date = sdk_date()?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let headers = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("host".to_string(), host.clone()),
        ("x-project-id".to_string(), site.project_id.clone()),
        ("x-sdk-date".to_string(), date.clone()),
    ];
    let signed: Vec<String> = headers.iter().map(|(k, _)| k.clone()).collect();
    let hash = hex::encode(Sha256::digest(payload.as_bytes()));
    let cr = sign::canonical_request(method, path, query, &headers, &signed, &hash);
    let sig = sign::signature(&site.secret_key, &sign::string_to_sign(&date, &cr));
    let mut all = headers;
    all.push((
        "authorization".into(),
        format!(
            "SDK-HMAC-SHA256 Access={}, SignedHeaders={}, Signature={sig}",
            site.access_key,
            signed.join(";")
        ),
    ));
    all.push(("accept".into(), "application/json".into()));
    let mut out = Vec::new();
    let body = if payload.is_empty() {
        Body::None
    } else {
        Body::Bytes(payload.as_bytes())
    };
    let r = http(&host, method, path_q, &all, body, &mut out, 0, &mut |_| {})?;
    let v: Value = if out.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out)
            .with_context(|| format!("{method} {path}: HTTP {}: response is not JSON", r.status))?
    };
    if !(200..300).contains(&r.status) {
        let e = if v["error"].is_object() {
            &v["error"]
        } else {
            &v
        };
        bail!(
            "{method} {path}: HTTP {} {}: {}",
            r.status,
            e["code"].as_str().unwrap_or("?"),
            e["message"].as_str().unwrap_or("")
        );
    }
    Ok(v)
}

// ---- S3 (AWS SigV4) --------------------------------------------------------------------------

fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// A signed S3 request. `query` pairs are unencoded; the body's SHA-256 is `payload_hash`.
#[allow(clippy::too_many_arguments)]
fn s3(
    site: &Site,
    method: &str,
    key: &str,
    query: &[(&str, String)],
    extra: &[(&str, String)],
    body: Body<'_>,
    payload_hash: &str,
    out: &mut dyn Write,
    rate: u64,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<Resp> {
    let host = host_of(&site.s3_endpoint)?;
    let now = time::OffsetDateTime::now_utc();
    let amz_date = now.format(&time::macros::format_description!(
        "[year][month][day]T[hour][minute][second]Z"
    ))?;
    let day = &amz_date[..8];
    let path = format!(
        "/{}/{}",
        uri_encode(&site.bucket, false),
        uri_encode(key, true)
    );
    let path = path.trim_end_matches('/').to_string();
    let mut q: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    q.sort();
    let qs = q
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut headers: Vec<(String, String)> = vec![
        ("host".into(), host.clone()),
        ("x-amz-content-sha256".into(), payload_hash.to_string()),
        ("x-amz-date".into(), amz_date.clone()),
    ];
    for (k, v) in extra {
        headers.push((k.to_ascii_lowercase(), v.clone()));
    }
    headers.sort();
    let signed = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canon_headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}:{}\n", v.trim()))
        .collect();
    let cr = format!("{method}\n{path}\n{qs}\n{canon_headers}\n{signed}\n{payload_hash}");
    let scope = format!("{day}/{}/s3/aws4_request", site.region);
    let sts = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(cr.as_bytes()))
    );
    let k = hmac(format!("AWS4{}", site.secret_key).as_bytes(), day);
    let k = hmac(&k, &site.region);
    let k = hmac(&k, "s3");
    let k = hmac(&k, "aws4_request");
    let sig = hex::encode(hmac(&k, &sts));
    headers.push((
        "authorization".into(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={sig}",
            site.access_key
        ),
    ));
    let path_q = if qs.is_empty() {
        path
    } else {
        format!("{path}?{qs}")
    };
    http(&host, method, &path_q, &headers, body, out, rate, progress)
}

fn s3_ok(r: &Resp, body: &[u8], what: &str) -> anyhow::Result<()> {
    if (200..300).contains(&r.status) {
        return Ok(());
    }
    bail!(
        "{what}: HTTP {}: {}",
        r.status,
        String::from_utf8_lossy(body)
            .chars()
            .take(500)
            .collect::<String>()
    )
}

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Values of `<tag>` elements, in order.
fn xml_all(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(after[..j].to_string());
        rest = &after[j + close.len()..];
    }
    out
}

// ---- the transfer ----------------------------------------------------------------------------

fn bar(hidden: bool, len: u64, what: &str) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

fn save(path: &Path, st: &State) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Polls an IMS job to its end with a progress bar; returns the job.
fn wait_job(site: &Site, job_id: &str, pb: &ProgressBar) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(24 * 3600);
    loop {
        let j = ims(
            site,
            "GET",
            &format!("/v1/{}/jobs/{job_id}", site.project_id),
            None,
        )?;
        let e = &j["entities"];
        if let (Some(d), Some(t)) = (e["bytes_done"].as_u64(), e["bytes_total"].as_u64()) {
            if t > 0 {
                pb.set_length(t);
                pb.set_position(d);
            }
        }
        match j["status"].as_str() {
            Some("SUCCESS") => {
                pb.set_position(pb.length().unwrap_or(0));
                pb.finish();
                return Ok(j);
            }
            Some("FAIL") => bail!(
                "job {job_id} failed: {} {}",
                j["error_code"].as_str().unwrap_or("?"),
                j["fail_reason"].as_str().unwrap_or("")
            ),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("job {job_id} did not finish");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `openims transfer`.
pub fn run(a: TransferArgs) -> anyhow::Result<()> {
    let from = Site {
        endpoint: a.from_endpoint.clone(),
        s3_endpoint: a.from_s3_endpoint.clone(),
        access_key: a.from_access_key.clone(),
        secret_key: a.from_secret_key.clone(),
        project_id: a.from_project_id.clone(),
        region: a.from_region.clone(),
        bucket: a.from_bucket.clone(),
    };
    let to = Site {
        endpoint: a.to_endpoint.clone(),
        s3_endpoint: a.to_s3_endpoint.clone(),
        access_key: a.to_access_key.clone(),
        secret_key: a.to_secret_key.clone(),
        project_id: a.to_project_id.clone(),
        region: a.to_region.clone(),
        bucket: a.to_bucket.clone(),
    };
    if !matches!(a.format.as_str(), "qcow2" | "vhd" | "vmdk") {
        bail!("--format must be qcow2, vhd or vmdk");
    }
    if !(5..=5120).contains(&a.part_size_mib) {
        bail!("--part-size-mib must be 5-5120");
    }
    std::fs::create_dir_all(&a.work_dir)?;
    let state_path = a
        .work_dir
        .join(format!("{}.{}.transfer.json", a.image, a.format));
    let file_path = a.work_dir.join(format!("{}.{}", a.image, a.format));
    let part_path = a.work_dir.join(format!("{}.{}.part", a.image, a.format));
    let mut st: State = match std::fs::read(&state_path) {
        Ok(b) => serde_json::from_slice(&b).context("reading the state file")?,
        Err(_) => State {
            image_id: a.image.clone(),
            format: a.format.clone(),
            object: format!("openims-transfer/{}.{}", a.image, a.format),
            ..State::default()
        },
    };
    let mut sum = Summary::default();
    let source = ims(&from, "GET", &format!("/v2/images/{}", a.image), None)?;

    // 1. Export at the source.
    if !st.exported {
        let job = match &st.export_job {
            Some(j) => j.clone(),
            None => {
                let v = ims(
                    &from,
                    "POST",
                    &format!("/v1/cloudimages/{}/file", a.image),
                    Some(
                        &json!({"bucket_url": format!("{}:{}", from.bucket, st.object), "file_format": a.format}),
                    ),
                )?;
                let j = v["job_id"]
                    .as_str()
                    .ok_or_else(|| anyhow!("export answered no job_id"))?
                    .to_string();
                st.export_job = Some(j.clone());
                save(&state_path, &st)?;
                j
            }
        };
        wait_job(&from, &job, &bar(a.no_progress, 0, "export"))?;
        st.exported = true;
        save(&state_path, &st)?;
    }

    // 2. Download (ranged, continuing from what is on disk).
    if !st.downloaded {
        let mut sink = std::io::sink();
        let r = s3(
            &from,
            "HEAD",
            &st.object,
            &[],
            &[],
            Body::None,
            EMPTY_SHA256,
            &mut sink,
            0,
            &mut |_| {},
        )?;
        s3_ok(&r, b"", "HEAD of the exported file")?;
        st.size = r
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("HEAD gave no length"))?;
        st.digest = r
            .header("x-amz-meta-openims-disk-digest")
            .map(str::to_string);
        save(&state_path, &st)?;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part_path)?;
        let have = f.metadata()?.len().min(st.size);
        f.set_len(have)?;
        sum.bytes_download_resumed = have;
        if have > 0 {
            eprintln!("download: resuming at byte {have} of {}", st.size);
        }
        let pb = bar(a.no_progress, st.size, "download");
        pb.set_position(have);
        let mut pos = have;
        const RANGE: u64 = 32 << 20;
        while pos < st.size {
            let end = (pos + RANGE).min(st.size) - 1;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
            let r = s3(
                &from,
                "GET",
                &st.object,
                &[],
                &[("range", format!("bytes={pos}-{end}"))],
                Body::None,
                EMPTY_SHA256,
                &mut w,
                a.limit_rate,
                &mut |n| pb.inc(n),
            )?;
            w.flush()?;
            drop(w);
            if r.status != 206 && r.status != 200 {
                bail!("download of {}: HTTP {}", st.object, r.status);
            }
            let now = f.metadata()?.len();
            if now != end + 1 {
                bail!(
                    "download of {}: got {} bytes, expected {}",
                    st.object,
                    now - pos,
                    end + 1 - pos
                );
            }
            sum.bytes_downloaded += now - pos;
            pos = now;
        }
        f.sync_all()?;
        pb.finish();
        st.sha256 = Some(sha256_file(&part_path)?);
        std::fs::rename(&part_path, &file_path)?;
        st.downloaded = true;
        save(&state_path, &st)?;
    }
    let sha = st.sha256.clone().unwrap_or_default();
    if !file_path.exists() && !st.uploaded {
        bail!(
            "{} is gone; remove {} to start over",
            file_path.display(),
            state_path.display()
        );
    }
    if !st.uploaded && sha256_file(&file_path)? != sha {
        bail!(
            "{} changed since it was downloaded (SHA-256 differs)",
            file_path.display()
        );
    }

    // 3. Upload (multipart; parts the target already has are not sent again).
    if !st.uploaded {
        let file = File::open(&file_path)?;
        let part = a.part_size_mib << 20;
        let upload_id = match &st.upload_id {
            Some(u) => u.clone(),
            None => {
                let mut out = Vec::new();
                let r = s3(
                    &to,
                    "POST",
                    &st.object,
                    &[("uploads", String::new())],
                    &[("content-type", "application/octet-stream".into())],
                    Body::None,
                    EMPTY_SHA256,
                    &mut out,
                    0,
                    &mut |_| {},
                )?;
                s3_ok(&r, &out, "CreateMultipartUpload")?;
                let id = xml_all(&String::from_utf8_lossy(&out), "UploadId")
                    .pop()
                    .ok_or_else(|| anyhow!("CreateMultipartUpload gave no UploadId"))?;
                st.upload_id = Some(id.clone());
                save(&state_path, &st)?;
                id
            }
        };
        // Parts already there (ListParts), verified against the file by MD5.
        let mut out = Vec::new();
        let r = s3(
            &to,
            "GET",
            &st.object,
            &[
                ("uploadId", upload_id.clone()),
                ("max-parts", "10000".into()),
            ],
            &[],
            Body::None,
            EMPTY_SHA256,
            &mut out,
            0,
            &mut |_| {},
        )?;
        s3_ok(&r, &out, "ListParts")?;
        let xml = String::from_utf8_lossy(&out).to_string();
        let numbers = xml_all(&xml, "PartNumber");
        let etags = xml_all(&xml, "ETag");
        let sizes = xml_all(&xml, "Size");
        let nparts = st.size.div_ceil(part).max(1);
        let mut have: std::collections::BTreeMap<u64, String> = Default::default();
        for ((n, e), s) in numbers.iter().zip(&etags).zip(&sizes) {
            let (Ok(n), Ok(s)) = (n.parse::<u64>(), s.parse::<u64>()) else {
                continue;
            };
            let expect = part.min(st.size - (n - 1).min(nparts - 1) * part);
            if n >= 1 && n <= nparts && s == expect {
                have.insert(n, e.replace("&quot;", "").replace('"', ""));
            }
        }
        if !have.is_empty() {
            eprintln!(
                "upload: resuming, the target already has {} of {nparts} parts",
                have.len()
            );
        }
        let pb = bar(a.no_progress, st.size, "upload");
        let mut etags_final = Vec::new();
        for n in 1..=nparts {
            let off = (n - 1) * part;
            let len = part.min(st.size - off);
            let (md5, sha) = hash_range(&file, off, len)?;
            if let Some(e) = have.get(&n) {
                if *e == md5 {
                    sum.parts_already_uploaded += 1;
                    pb.inc(len);
                    etags_final.push((n, e.clone()));
                    continue;
                }
            }
            let mut out = Vec::new();
            let r = s3(
                &to,
                "PUT",
                &st.object,
                &[
                    ("partNumber", n.to_string()),
                    ("uploadId", upload_id.clone()),
                ],
                &[],
                Body::File(&file, off, len, a.limit_rate),
                &sha,
                &mut out,
                0,
                &mut |k| pb.inc(k),
            )?;
            s3_ok(&r, &out, "UploadPart")?;
            let etag = r.header("etag").unwrap_or("").replace('"', "");
            if etag != md5 {
                bail!("part {n}: the target stored MD5 {etag}, the file has {md5}");
            }
            sum.parts_uploaded += 1;
            sum.bytes_uploaded += len;
            etags_final.push((n, etag));
        }
        pb.finish();
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (n, e) in &etags_final {
            xml.push_str(&format!(
                "<Part><PartNumber>{n}</PartNumber><ETag>\"{e}\"</ETag></Part>"
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let mut out = Vec::new();
        let hash = hex::encode(Sha256::digest(xml.as_bytes()));
        let r = s3(
            &to,
            "POST",
            &st.object,
            &[("uploadId", upload_id.clone())],
            &[("content-type", "application/xml".into())],
            Body::Bytes(xml.as_bytes()),
            &hash,
            &mut out,
            0,
            &mut |_| {},
        )?;
        s3_ok(&r, &out, "CompleteMultipartUpload")?;
        if String::from_utf8_lossy(&out).contains("<Error>") {
            bail!("CompleteMultipartUpload: {}", String::from_utf8_lossy(&out));
        }
        st.uploaded = true;
        save(&state_path, &st)?;
    }

    // 4. Register at the target.
    if !st.registered {
        let target = match &st.target_image_id {
            Some(t) => t.clone(),
            None => {
                let name = a
                    .name
                    .clone()
                    .or_else(|| source["name"].as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("transfer-{}", a.image));
                let mut body = json!({
                    "name": name,
                    "disk_format": a.format,
                    "container_format": "bare",
                    "min_disk": source["min_disk"].as_i64().unwrap_or(0),
                    "min_ram": source["min_ram"].as_i64().unwrap_or(0),
                });
                if let Some(os) = source["__os_version"].as_str() {
                    body["__os_version"] = json!(os);
                }
                let v = ims(&to, "POST", "/v2/images", Some(&body))?;
                let id = v["id"]
                    .as_str()
                    .ok_or_else(|| anyhow!("POST /v2/images gave no id"))?
                    .to_string();
                st.target_image_id = Some(id.clone());
                save(&state_path, &st)?;
                id
            }
        };
        let job = match &st.register_job {
            Some(j) => j.clone(),
            None => {
                let v = ims(
                    &to,
                    "PUT",
                    &format!("/v1/cloudimages/{target}/upload"),
                    Some(&json!({"image_url": format!("{}:{}", to.bucket, st.object)})),
                )?;
                let j = v["job_id"]
                    .as_str()
                    .ok_or_else(|| anyhow!("register gave no job_id"))?
                    .to_string();
                st.register_job = Some(j.clone());
                save(&state_path, &st)?;
                j
            }
        };
        wait_job(&to, &job, &bar(a.no_progress, 0, "register"))?;
        st.registered = true;
        save(&state_path, &st)?;
    }

    // 5. Verify: the target's disk digest is the source's.
    let target = st.target_image_id.clone().unwrap_or_default();
    let shown = ims(&to, "GET", &format!("/v2/images/{target}"), None)?;
    let got = shown["__disk_digest"].as_str().unwrap_or("").to_string();
    let want = st
        .digest
        .clone()
        .or_else(|| source["__disk_digest"].as_str().map(str::to_string));
    match &want {
        Some(w) if *w == got => sum.verified = true,
        Some(w) => bail!(
            "verification failed: the target's disk digest {got} differs from the source's {w}"
        ),
        None => {
            bail!("the source gave no disk digest, so the transfer cannot be verified end to end")
        }
    }
    if shown["status"].as_str() != Some("active") {
        bail!("the target image {target} is {}", shown["status"]);
    }
    sum.target_image_id = target;
    sum.bytes = st.size;
    sum.sha256 = sha;
    sum.disk_digest = got;
    if a.keep_file {
        sum.file = Some(file_path.clone());
    } else {
        let _ = std::fs::remove_file(&file_path);
    }
    let _ = std::fs::remove_file(&state_path);
    if a.json {
        println!("{}", serde_json::to_string(&sum)?);
    } else {
        println!(
            "transferred image {} -> {} ({} bytes; downloaded {}, resumed {}; parts sent {}, already there {}); disk digest verified",
            a.image, sum.target_image_id, sum.bytes, sum.bytes_downloaded, sum.bytes_download_resumed,
            sum.parts_uploaded, sum.parts_already_uploaded
        );
    }
    Ok(())
}

fn sha256_file(p: &Path) -> anyhow::Result<String> {
    let mut f = File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// MD5 (hex, the part's ETag) and SHA-256 (hex, the signed payload hash) of a file range.
fn hash_range(f: &File, off: u64, len: u64) -> anyhow::Result<(String, String)> {
    use md5::Md5;
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::Start(off))?;
    let (mut m, mut s) = (Md5::new(), Sha256::new());
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        f.read_exact(&mut buf[..n])?;
        m.update(&buf[..n]);
        s.update(&buf[..n]);
        left -= n as u64;
    }
    Ok((hex::encode(m.finalize()), hex::encode(s.finalize())))
}
