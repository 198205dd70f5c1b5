//! Load generator for `benches/api`: sends `SDK-HMAC-SHA256`-signed requests exactly as the
//! Huawei Cloud SDK signs them (using the server's own canonicalisation code, whose unit tests
//! pin it to the SDK's test vectors), and reports requests/second and latency percentiles.
//!
//! Usage:
//!   openims-loadgen seed   ENDPOINT AK SK PROJECT COUNT
//!   openims-loadgen run    ENDPOINT AK SK PROJECT PATH[?QUERY] SECONDS CONCURRENCY
//!   openims-loadgen first-image ENDPOINT AK SK PROJECT

use openims_api::sign;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Creds {
    endpoint: String,
    host: String,
    ak: String,
    sk: String,
    project: String,
}

fn sdk_date() -> String {
    let f = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::OffsetDateTime::now_utc().format(&f).unwrap_or_default()
}

fn signed(client: &reqwest::Client, c: &Creds, method: &str, path_q: &str, body: Option<&str>) -> reqwest::RequestBuilder {
    let (path, query) = path_q.split_once('?').unwrap_or((path_q, ""));
    let date = sdk_date();
    let ct = if body.is_some() { "application/json;charset=utf-8" } else { "application/json" };
    let headers = vec![
        ("content-type".to_string(), ct.to_string()),
        ("host".to_string(), c.host.clone()),
        ("user-agent".to_string(), "openims-loadgen".to_string()),
        ("x-project-id".to_string(), c.project.clone()),
        ("x-sdk-date".to_string(), date.clone()),
    ];
    let signed_headers: Vec<String> = headers.iter().map(|(k, _)| k.clone()).collect();
    let payload = match body {
        Some(b) => hex::encode(Sha256::digest(b.as_bytes())),
        None => sign::EMPTY_SHA256.to_string(),
    };
    let cr = sign::canonical_request(method, path, query, &headers, &signed_headers, &payload);
    let sig = sign::signature(&c.sk, &sign::string_to_sign(&date, &cr));
    let auth = format!(
        "SDK-HMAC-SHA256 Access={}, SignedHeaders={}, Signature={sig}",
        c.ak,
        signed_headers.join(";")
    );
    let url = format!("{}{}", c.endpoint, path_q);
    let mut rb = client
        .request(method.parse().unwrap_or(reqwest::Method::GET), url)
        .header("content-type", ct)
        .header("user-agent", "openims-loadgen")
        .header("x-project-id", &c.project)
        .header("x-sdk-date", date)
        .header("authorization", auth);
    if let Some(b) = body {
        rb = rb.body(b.to_string());
    }
    rb
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("usage: openims-loadgen seed|run|first-image ENDPOINT AK SK PROJECT ...");
        std::process::exit(2);
    }
    let endpoint = args[2].trim_end_matches('/').to_string();
    let host = endpoint.trim_start_matches("http://").to_string();
    let c = Arc::new(Creds { endpoint, host, ak: args[3].clone(), sk: args[4].clone(), project: args[5].clone() });
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().expect("http client");
    match args[1].as_str() {
        "seed" => {
            let count: usize = args.get(6).and_then(|s| s.parse().ok()).unwrap_or(1000);
            let mut tasks = Vec::new();
            for w in 0..8 {
                let (client, c) = (client.clone(), c.clone());
                tasks.push(tokio::spawn(async move {
                    let mut i = w;
                    while i < count {
                        let body = format!(r#"{{"name": "bench-{i:05}", "disk_format": "qcow2", "container_format": "bare", "tags": ["bench"]}}"#);
                        let r = signed(&client, &c, "POST", "/v2/images", Some(&body)).send().await.expect("seed request");
                        assert_eq!(r.status().as_u16(), 201, "seed failed: {}", r.text().await.unwrap_or_default());
                        i += 8;
                    }
                }));
            }
            for t in tasks {
                t.await.expect("seed task");
            }
            println!("seeded {count}");
        }
        "first-image" => {
            let r = signed(&client, &c, "GET", "/v2/images?limit=1", None).send().await.expect("list");
            let v: serde_json::Value = r.json().await.expect("json");
            println!("{}", v["images"][0]["id"].as_str().unwrap_or(""));
        }
        "run" => {
            let path = args[6].clone();
            let secs: u64 = args[7].parse().unwrap_or(10);
            let conc: usize = args[8].parse().unwrap_or(16);
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut tasks = Vec::new();
            for _ in 0..conc {
                let (client, c, path) = (client.clone(), c.clone(), path.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut errors = 0u64;
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        match signed(&client, &c, "GET", &path, None).send().await {
                            Ok(r) if r.status().is_success() => {
                                let _ = r.bytes().await;
                                lat.push(t0.elapsed());
                            }
                            _ => errors += 1,
                        }
                    }
                    (lat, errors)
                }));
            }
            let start = Instant::now();
            let mut all = Vec::new();
            let mut errors = 0;
            for t in tasks {
                let (l, e) = t.await.expect("task");
                all.extend(l);
                errors += e;
            }
            let elapsed = start.elapsed().as_secs_f64().max(secs as f64);
            all.sort();
            println!(
                "{{\"path\": \"{path}\", \"requests\": {}, \"errors\": {errors}, \"rps\": {:.1}, \"p50_ms\": {:.2}, \"p99_ms\": {:.2}}}",
                all.len(),
                all.len() as f64 / elapsed,
                percentile(&all, 0.50),
                percentile(&all, 0.99)
            );
        }
        other => {
            eprintln!("unknown command {other}");
            std::process::exit(2);
        }
    }
}
