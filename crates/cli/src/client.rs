//! Client commands that talk to a running service over its API, signed with AK/SK exactly as
//! the Huawei Cloud SDK signs (`SDK-HMAC-SHA256`, using `openims_api::sign`).
//!
//! `openims usage`: the caller's storage usage (`GET /v1/cloudimages/usage`, an OpenIMS
//! extension): logical bytes vs billable bytes.
//!
//! The transport is a deliberately small HTTP/1.1 client over `std::net::TcpStream` (plain
//! `http://` endpoints, one request per connection): enough for JSON control calls.

use anyhow::{anyhow, bail, Context};
use clap::Args;
use openims_api::sign;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Connection settings shared by client commands (also read from the `OPENIMS_*` variables
/// of a `credentials` file sourced into the environment).
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// API endpoint, e.g. http://127.0.0.1:9292.
    #[arg(
        long,
        env = "OPENIMS_ENDPOINT",
        default_value = "http://127.0.0.1:9292"
    )]
    pub endpoint: String,
    /// Access key.
    #[arg(long, env = "OPENIMS_ACCESS_KEY")]
    pub access_key: String,
    /// Secret key.
    #[arg(long, env = "OPENIMS_SECRET_KEY", hide_env_values = true)]
    pub secret_key: String,
    /// Project id the key acts in.
    #[arg(long, env = "OPENIMS_PROJECT_ID")]
    pub project_id: String,
    /// Output format: table or json.
    #[arg(long, default_value = "table")]
    pub output: String,
}

/// `openims usage` arguments.
#[derive(Args, Debug, Clone)]
pub struct UsageArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

fn sdk_date() -> anyhow::Result<String> {
    let f = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    Ok(time::OffsetDateTime::now_utc().format(&f)?)
}

/// Sends a signed GET and returns the parsed JSON body (errors for non-2xx answers).
pub fn signed_get(c: &ClientArgs, path_q: &str) -> anyhow::Result<Value> {
    signed_request(c, "GET", path_q, None)
}

/// Sends a signed request (a JSON body for POST/PUT/DELETE, signed by its SHA-256 as the SDK
/// does) and returns the parsed JSON body; an empty 2xx body is `null`. Non-2xx answers are
/// errors carrying the status and the IMG code.
pub fn signed_request(
    c: &ClientArgs,
    method: &str,
    path_q: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    use sha2::{Digest, Sha256};
    let rest = c
        .endpoint
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// endpoints are supported, got {}", c.endpoint))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        bail!("endpoint must be http://HOST:PORT, got {}", c.endpoint);
    }
    let (path, query) = path_q.split_once('?').unwrap_or((path_q, ""));
    let date = sdk_date()?;
    let payload = match body {
        Some(b) => serde_json::to_vec(b)?,
        None => Vec::new(),
    };
    let content_type = if body.is_some() {
        "application/json;charset=utf-8"
    } else {
        "application/json"
    };
    let headers = vec![
        ("content-type".to_string(), content_type.to_string()),
        ("host".to_string(), host.to_string()),
        ("x-project-id".to_string(), c.project_id.clone()),
        ("x-sdk-date".to_string(), date.clone()),
    ];
    let signed: Vec<String> = headers.iter().map(|(k, _)| k.clone()).collect();
    let payload_hash = hex::encode(Sha256::digest(&payload));
    let cr = sign::canonical_request(method, path, query, &headers, &signed, &payload_hash);
    let sig = sign::signature(&c.secret_key, &sign::string_to_sign(&date, &cr));
    let mut req = format!("{method} {path_q} HTTP/1.1\r\n");
    for (k, v) in &headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!(
        "authorization: SDK-HMAC-SHA256 Access={}, SignedHeaders={}, Signature={sig}\r\n",
        c.access_key,
        signed.join(";")
    ));
    req.push_str(&format!("content-length: {}\r\n", payload.len()));
    req.push_str("accept: application/json\r\nconnection: close\r\n\r\n");
    let mut s = TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(req.as_bytes())?;
    s.write_all(&payload)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status line"))?;
    if head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    }) {
        body = dechunk(&body)?;
    }
    if body.is_empty() && (200..300).contains(&status) {
        return Ok(Value::Null);
    }
    let v: Value = serde_json::from_slice(&body)
        .with_context(|| format!("HTTP {status}: response is not JSON"))?;
    if !(200..300).contains(&status) {
        let code = v["error"]["code"].as_str().unwrap_or("?");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        bail!("HTTP {status} {code}: {msg}");
    }
    Ok(v)
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunked body"))?;
        let size_txt = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("truncated chunked body");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// `openims job` arguments.
#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    #[command(subcommand)]
    pub cmd: JobCmd,
}

/// `openims job` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum JobCmd {
    /// Shows a job until it ends: a live progress bar with bytes, throughput, ETA and queue
    /// position (`--output json` prints one JSON line per poll instead). Exits 0 on SUCCESS,
    /// 1 on FAIL.
    Watch {
        job_id: String,
        #[command(flatten)]
        client: ClientArgs,
        /// Seconds between polls.
        #[arg(long, default_value_t = 0.5)]
        interval: f64,
        /// Give up after this many seconds (0 = never).
        #[arg(long, default_value_t = 0.0)]
        timeout: f64,
    },
    /// Shows a job once.
    Show {
        job_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn human_bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

/// `openims job ...`.
pub fn job(args: JobArgs) -> anyhow::Result<()> {
    match args.cmd {
        JobCmd::Show { job_id, client } => {
            let v = signed_get(&client, &format!("/v1/{}/jobs/{job_id}", client.project_id))?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        JobCmd::Watch {
            job_id,
            client,
            interval,
            timeout,
        } => watch(&client, &job_id, interval, timeout),
    }
}

fn watch(c: &ClientArgs, job_id: &str, interval: f64, timeout: f64) -> anyhow::Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};
    let path = format!("/v1/{}/jobs/{job_id}", c.project_id);
    let json_out = c.output == "json";
    let bar = if json_out {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(100)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{bar:32}] {percent:>3}% {msg}",
        )?
        .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    loop {
        let v = signed_get(c, &path)?;
        let status = v["status"].as_str().unwrap_or("?").to_string();
        let e = &v["entities"];
        let f = |k: &str| e[k].as_f64().unwrap_or(0.0);
        if json_out {
            println!("{}", serde_json::to_string(&v)?);
        } else {
            bar.set_position(f("process_percent").clamp(0.0, 100.0) as u64);
            let mut msg = format!(
                "{status} {} {}/{}",
                e["current_task"].as_str().unwrap_or(""),
                human_bytes(f("bytes_done")),
                human_bytes(f("bytes_total"))
            );
            if let Some(t) = e["throughput_bytes_per_second"].as_f64() {
                msg.push_str(&format!(" {}/s", human_bytes(t)));
            }
            if let Some(eta) = e["eta_seconds"].as_i64() {
                msg.push_str(&format!(" ETA {eta}s"));
            }
            if let Some(q) = e["queue_position"].as_u64() {
                msg.push_str(&format!(" queue position {q}"));
            }
            if let Some(s) = e["bytes_sent"].as_u64() {
                msg.push_str(&format!(" sent {}", human_bytes(s as f64)));
            }
            bar.set_message(msg);
            bar.tick();
        }
        match status.as_str() {
            "SUCCESS" => {
                bar.finish();
                if !json_out {
                    println!(
                        "job {job_id} SUCCESS image {}",
                        e["image_id"].as_str().unwrap_or("-")
                    );
                }
                return Ok(());
            }
            "FAIL" => {
                bar.abandon();
                bail!(
                    "job {job_id} FAIL {}: {}",
                    v["error_code"].as_str().unwrap_or("?"),
                    v["fail_reason"].as_str().unwrap_or("")
                );
            }
            _ => {}
        }
        if timeout > 0.0 && started.elapsed().as_secs_f64() > timeout {
            bar.abandon();
            bail!("job {job_id} still {status} after {timeout} s");
        }
        std::thread::sleep(Duration::from_secs_f64(interval.max(0.05)));
    }
}

/// `openims usage`.
pub fn usage(args: UsageArgs) -> anyhow::Result<()> {
    let v = signed_get(&args.client, "/v1/cloudimages/usage")?;
    if args.client.output == "json" {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "project          {}",
        v["project_id"].as_str().unwrap_or("")
    );
    println!("images           {}", n("images"));
    println!(
        "logical bytes    {} ({:.3} GiB)",
        n("logical_bytes"),
        gib(n("logical_bytes"))
    );
    println!(
        "billable bytes   {} ({:.3} GiB)",
        n("billable_bytes"),
        gib(n("billable_bytes"))
    );
    println!("saved by sharing {}", n("saved_bytes"));
    println!(
        "cross-project    {}",
        v["cross_project_policy"].as_str().unwrap_or("")
    );
    Ok(())
}
