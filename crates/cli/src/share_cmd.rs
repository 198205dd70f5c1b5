//! `openims image share|unshare|accept|reject|shared-with-me`: sharing images between
//! projects from the command line, through a running service's IMS API (AK/SK-signed like
//! `openims usage`). The batch member operations are jobs: the commands wait for them and print
//! one line per (image, member) from the job's `results`; a failed member makes the command
//! exit non-zero.

use crate::client::{signed_get, signed_request, ClientArgs};
use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Owner side: `share` / `unshare`.
#[derive(Args, Debug, Clone)]
pub struct MembersArgs {
    /// Image ids.
    #[arg(required = true)]
    pub images: Vec<String>,
    /// Recipient project id (repeatable).
    #[arg(long = "project")]
    pub projects: Vec<String>,
    /// Recipient domain (account) id: every project of the domain (repeatable).
    #[arg(long = "domain")]
    pub domains: Vec<String>,
    /// Print the job id and return without waiting for it.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Recipient side: `accept` / `reject`.
#[derive(Args, Debug, Clone)]
pub struct AnswerArgs {
    /// Image ids shared with the caller's project.
    #[arg(required = true)]
    pub images: Vec<String>,
    /// Print the job id and return without waiting for it.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `shared-with-me`.
#[derive(Args, Debug, Clone)]
pub struct SharedWithMeArgs {
    /// Only shares in this state: pending, accepted or rejected (default: all three).
    #[arg(long)]
    pub status: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Longest wait for a member job.
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// Polls a job until it ends (bounded by [`JOB_TIMEOUT`]).
fn wait_job(c: &ClientArgs, job_id: &str) -> anyhow::Result<Value> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        let job = signed_get(c, &format!("/v1/{}/jobs/{job_id}", c.project_id))?;
        match job["status"].as_str() {
            Some("SUCCESS") | Some("FAIL") => return Ok(job),
            Some("INIT") | Some("RUNNING") => {}
            other => bail!("job {job_id} has an unknown status {other:?}"),
        }
        if started.elapsed() > JOB_TIMEOUT {
            bail!(
                "job {job_id} did not finish within {}s",
                JOB_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Runs a member job request and reports it; errors if the job or any member failed.
fn run_job(
    c: &ClientArgs,
    method: &str,
    body: Value,
    no_wait: bool,
    what: &str,
) -> anyhow::Result<()> {
    let r = signed_request(c, method, "/v1/cloudimages/members", Some(&body))
        .with_context(|| format!("{what} refused"))?;
    let job_id = r["job_id"]
        .as_str()
        .context("the service answered without a job_id")?
        .to_string();
    if no_wait {
        if c.output == "json" {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!("job {job_id}");
        }
        return Ok(());
    }
    let job = wait_job(c, &job_id)?;
    let results = job["entities"]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if c.output == "json" {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        println!("{:<36}  {:<32}  {:<8}  detail", "image", "member", "result");
        for r in &results {
            let detail = match (r["error_code"].as_str(), r["error_msg"].as_str()) {
                (Some(code), Some(msg)) => format!("{code} {msg}"),
                _ => String::new(),
            };
            println!(
                "{:<36}  {:<32}  {:<8}  {detail}",
                r["image_id"].as_str().unwrap_or(""),
                r["project_id"].as_str().unwrap_or(""),
                r["status"].as_str().unwrap_or(""),
            );
        }
    }
    if job["status"] != "SUCCESS" {
        bail!(
            "{what}: job {job_id} failed: {} {}",
            job["error_code"].as_str().unwrap_or(""),
            job["fail_reason"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `openims image share`.
pub fn share(a: MembersArgs) -> anyhow::Result<()> {
    if a.projects.is_empty() && a.domains.is_empty() {
        bail!("name at least one recipient with --project or --domain");
    }
    let body = json!({"images": a.images, "projects": a.projects, "domains": a.domains});
    run_job(&a.client, "POST", body, a.no_wait, "share")
}

/// `openims image unshare`.
pub fn unshare(a: MembersArgs) -> anyhow::Result<()> {
    if a.projects.is_empty() && a.domains.is_empty() {
        bail!("name at least one recipient with --project or --domain");
    }
    let body = json!({"images": a.images, "projects": a.projects, "domains": a.domains});
    run_job(&a.client, "DELETE", body, a.no_wait, "unshare")
}

/// `openims image accept` / `reject`.
pub fn answer(a: AnswerArgs, status: &str) -> anyhow::Result<()> {
    let body = json!({"images": a.images, "project_id": a.client.project_id, "status": status});
    run_job(&a.client, "PUT", body, a.no_wait, status)
}

/// `openims image shared-with-me`.
pub fn shared_with_me(a: SharedWithMeArgs) -> anyhow::Result<()> {
    let statuses: Vec<&str> = match a.status.as_deref() {
        None => vec!["pending", "accepted", "rejected"],
        Some(s @ ("pending" | "accepted" | "rejected")) => vec![s],
        Some(s) => bail!("--status must be pending, accepted or rejected, not {s}"),
    };
    let mut rows = Vec::new();
    for s in statuses {
        let v = signed_get(
            &a.client,
            &format!("/v2/cloudimages?__imagetype=shared&member_status={s}"),
        )?;
        for img in v["images"].as_array().cloned().unwrap_or_default() {
            rows.push((s, img));
        }
    }
    if a.client.output == "json" {
        let out: Vec<Value> = rows
            .iter()
            .map(|(s, img)| json!({"member_status": s, "image": img}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<36}  {:<24}  {:<32}  {:<8}  {:>12}",
        "id", "name", "owner", "status", "size"
    );
    for (s, img) in &rows {
        println!(
            "{:<36}  {:<24}  {:<32}  {:<8}  {:>12}",
            img["id"].as_str().unwrap_or(""),
            img["name"].as_str().unwrap_or(""),
            img["owner"].as_str().unwrap_or(""),
            s,
            img["__image_size"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}
