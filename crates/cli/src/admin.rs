//! `openims admin`: domains, projects, users and keys, directly on the metadata database
//! (works while the server runs).

use crate::config::{resolve_common, CommonArgs};
use clap::{Args, Subcommand, ValueEnum};
use openims_core::data::DataPlane;
use openims_core::db::Db;
use openims_core::identity::{random_password, Domain};
use openims_core::ServiceConfig;
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Args)]
pub struct AdminArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    what: What,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum What {
    /// Domains (accounts).
    Domain {
        #[command(subcommand)]
        cmd: DomainCmd,
    },
    /// Projects (tenants).
    Project {
        #[command(subcommand)]
        cmd: ProjectCmd,
    },
    /// Users.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// AK/SK keys.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// IAM agencies: let a cloud service act for a domain (cross-region replication needs
    /// one delegating to the image service).
    Agency {
        #[command(subcommand)]
        cmd: AgencyCmd,
    },
    /// Peer service accounts: what another region's deployment signs its peer calls with.
    PeerAccount {
        #[command(subcommand)]
        cmd: PeerAccountCmd,
    },
    /// Delete stored data that no image references (older than the grace period).
    Gc {
        /// Keep unreferenced data younger than this many seconds.
        #[arg(long, default_value_t = 21600)]
        grace_secs: u64,
    },
    /// Verify every image's data: manifests parse and every chunk exists and hashes right.
    /// Exits with status 1 if anything is missing or corrupt.
    Fsck,
}

#[derive(Subcommand)]
enum DomainCmd {
    Create { name: String },
    List,
}

#[derive(Subcommand)]
enum ProjectCmd {
    Create {
        name: String,
        #[arg(long, default_value = "default")]
        domain: String,
    },
    List {
        #[arg(long)]
        domain: Option<String>,
    },
    Delete {
        id_or_name: String,
        #[arg(long)]
        domain: Option<String>,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    Create {
        name: String,
        #[arg(long, default_value = "default")]
        domain: String,
        /// Password (random if omitted; printed once).
        #[arg(long)]
        password: Option<String>,
    },
    List {
        #[arg(long)]
        domain: Option<String>,
    },
    Delete {
        name: String,
        #[arg(long, default_value = "default")]
        domain: String,
    },
    /// Lets a user act in a project.
    Grant {
        name: String,
        #[arg(long)]
        project: String,
        #[arg(long, default_value = "default")]
        domain: String,
    },
}

#[derive(Subcommand)]
enum AgencyCmd {
    Create {
        name: String,
        #[arg(long, default_value = "default")]
        domain: String,
        /// The service the agency delegates to.
        #[arg(long, default_value = openims_core::crossregion::IMS_SERVICE)]
        service: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    List {
        #[arg(long)]
        domain: Option<String>,
    },
    Delete {
        name: String,
        #[arg(long, default_value = "default")]
        domain: String,
    },
}

#[derive(Subcommand)]
enum PeerAccountCmd {
    /// Creates a service account and its AK/SK: give them to the peer region's
    /// `[peers.<this region>]` configuration.
    Create {
        /// Project the service account lives in (created if missing).
        #[arg(long, default_value = "peer-service")]
        project: String,
        #[arg(long, default_value = "default")]
        domain: String,
        /// User name of the service account.
        #[arg(long, default_value = "peer-service")]
        user: String,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    Create {
        #[arg(long)]
        project: String,
        /// User the key acts as (default: the domain's `admin`, created if missing).
        #[arg(long)]
        user: Option<String>,
        /// Domain of the project name and the user (default: the project's domain).
        #[arg(long)]
        domain: Option<String>,
    },
    List,
    Delete {
        access_key: String,
    },
}

pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let cfg = resolve_common(&args.common)?;
    std::fs::create_dir_all(&cfg.data_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let db = Db::connect(&cfg.database_url()).await?;
        let result = exec(&db, &cfg, args.what).await;
        db.pool.close().await;
        let out = result?;
        print(&out, args.output);
        if out.get("clean") == Some(&Value::Bool(false)) {
            std::process::exit(1);
        }
        Ok(())
    })
}

async fn domain_opt(db: &Db, d: &Option<String>) -> anyhow::Result<Option<Domain>> {
    Ok(match d {
        Some(d) => Some(db.find_domain(d).await?),
        None => None,
    })
}

async fn exec(db: &Db, cfg: &ServiceConfig, what: What) -> anyhow::Result<Value> {
    Ok(match what {
        What::Gc { grace_secs } => {
            let data = DataPlane::open(cfg)?;
            // One collector at a time across nodes: wait (up to 2 minutes) for a pass running
            // on a node to end, or for the lease of a node that died to expire.
            let holder = format!("admin-{}:gc", std::process::id());
            let mut waited = 0;
            while !db
                .try_lease(openims_core::cluster::GC_LEASE, &holder, 60_000)
                .await?
            {
                if waited >= 120 {
                    anyhow::bail!(
                        "garbage collection has been running on a node for 2 minutes; try again later"
                    );
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                waited += 1;
            }
            let renew = {
                let db = db.clone();
                let holder = holder.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(20)).await;
                        let _ = db
                            .try_lease(openims_core::cluster::GC_LEASE, &holder, 60_000)
                            .await;
                    }
                })
            };
            let r = match db.gc_inputs(Duration::from_secs(grace_secs)).await {
                Ok((live, grace)) => tokio::task::spawn_blocking(move || data.gc(&live, grace))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r.map_err(anyhow::Error::from)),
                Err(e) => Err(e.into()),
            };
            renew.abort();
            db.release_lease(openims_core::cluster::GC_LEASE, &holder)
                .await?;
            let r = r?;
            json!({
                "manifests_deleted": r.manifests_deleted, "chunks_deleted": r.chunks_deleted,
                "bytes_freed": r.chunk_bytes_freed + r.manifest_bytes_freed,
                "manifests_live": r.manifests_live, "chunks_live": r.chunks_live,
                "manifests_young": r.manifests_young, "chunks_young": r.chunks_young,
            })
        }
        What::Fsck => {
            let data = DataPlane::open(cfg)?;
            let live = db.live_manifests().await?;
            let r = tokio::task::spawn_blocking(move || data.fsck(&live)).await??;
            let list = |v: Vec<String>| json!(v);
            json!({
                "clean": r.is_clean(),
                "manifests_checked": r.manifests_checked,
                "chunks_checked": r.chunks_checked,
                "bytes_checked": r.bytes_checked,
                "missing_manifests": list(r.missing_manifests.iter().map(|m| m.to_string()).collect()),
                "corrupt_manifests": list(r.corrupt_manifests.iter().map(|(m, why)| format!("{m}: {why}")).collect()),
                "missing_chunks": list(r.missing_chunks.iter().map(|c| c.to_string()).collect()),
                "corrupt_chunks": list(r.corrupt_chunks.iter().map(|(c, why)| format!("{c}: {why}")).collect()),
                "orphan_manifests": r.orphan_manifests.len(),
                "orphan_chunks": r.orphan_chunks.len(),
            })
        }
        What::Domain { cmd } => match cmd {
            DomainCmd::Create { name } => json!(db.create_domain(&name).await?),
            DomainCmd::List => json!(db.list_domains().await?),
        },
        What::Project { cmd } => match cmd {
            ProjectCmd::Create { name, domain } => {
                let d = db.find_domain(&domain).await?;
                let p = db.create_project(&d, &name).await?;
                // The domain's admin user may act in every project of its domain.
                if let Some(admin) = db.find_user(&d, "admin").await? {
                    db.grant_role(&admin, &p, "admin").await?;
                }
                json!(p)
            }
            ProjectCmd::List { domain } => {
                let d = domain_opt(db, &domain).await?;
                json!(db.list_projects(d.as_ref()).await?)
            }
            ProjectCmd::Delete { id_or_name, domain } => {
                let d = domain_opt(db, &domain).await?;
                let p = db.find_project(&id_or_name, d.as_ref()).await?;
                db.delete_project(&p).await?;
                json!({"deleted": p.id})
            }
        },
        What::User { cmd } => match cmd {
            UserCmd::Create {
                name,
                domain,
                password,
            } => {
                let d = db.find_domain(&domain).await?;
                let pw = password.unwrap_or_else(random_password);
                let u = db.create_user(&d, &name, Some(&pw)).await?;
                json!({"id": u.id, "name": u.name, "domain_id": u.domain_id, "password": pw})
            }
            UserCmd::List { domain } => {
                let d = domain_opt(db, &domain).await?;
                json!(db.list_users(d.as_ref()).await?)
            }
            UserCmd::Delete { name, domain } => {
                let d = db.find_domain(&domain).await?;
                let u = db
                    .find_user(&d, &name)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no user {name} in domain {domain}"))?;
                db.delete_user(&u).await?;
                json!({"deleted": u.id})
            }
            UserCmd::Grant {
                name,
                project,
                domain,
            } => {
                let d = db.find_domain(&domain).await?;
                let u = db
                    .find_user(&d, &name)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no user {name} in domain {domain}"))?;
                let p = db.find_project(&project, Some(&d)).await?;
                db.grant_role(&u, &p, "admin").await?;
                json!({"user_id": u.id, "project_id": p.id})
            }
        },
        What::Agency { cmd } => match cmd {
            AgencyCmd::Create {
                name,
                domain,
                service,
                description,
            } => {
                let d = db.find_domain(&domain).await?;
                json!(
                    db.create_agency(d.id.as_str(), &name, &service, &description)
                        .await?
                )
            }
            AgencyCmd::List { domain } => {
                let d = domain_opt(db, &domain).await?;
                json!(db.list_agencies(d.as_ref().map(|d| d.id.as_str())).await?)
            }
            AgencyCmd::Delete { name, domain } => {
                let d = db.find_domain(&domain).await?;
                if !db.delete_agency(d.id.as_str(), &name).await? {
                    anyhow::bail!("no agency {name} in domain {domain}");
                }
                json!({"deleted": name})
            }
        },
        What::PeerAccount { cmd } => match cmd {
            PeerAccountCmd::Create {
                project,
                domain,
                user,
            } => {
                let d = db.find_domain(&domain).await?;
                let p = match db.find_project(&project, Some(&d)).await {
                    Ok(p) => p,
                    Err(_) => db.create_project(&d, &project).await?,
                };
                let u = match db.find_user(&d, &user).await? {
                    Some(u) => u,
                    None => db.create_user(&d, &user, None).await?,
                };
                let key = db.create_key(&u, &p).await?;
                db.grant_role(&u, &p, openims_core::crossregion::PEER_ROLE)
                    .await?;
                json!(key)
            }
        },
        What::Key { cmd } => match cmd {
            KeyCmd::Create {
                project,
                user,
                domain,
            } => {
                let d = domain_opt(db, &domain).await?;
                let p = db.find_project(&project, d.as_ref()).await?;
                let pd = db.find_domain(p.domain_id.as_str()).await?;
                let user_name = user.unwrap_or_else(|| "admin".into());
                let u = match db.find_user(&pd, &user_name).await? {
                    Some(u) => u,
                    None => db.create_user(&pd, &user_name, None).await?,
                };
                json!(db.create_key(&u, &p).await?)
            }
            KeyCmd::List => json!(db.list_keys().await?),
            KeyCmd::Delete { access_key } => {
                if !db.delete_key(&access_key).await? {
                    anyhow::bail!("no key {access_key}");
                }
                json!({"deleted": access_key})
            }
        },
    })
}

fn print(v: &Value, output: Output) {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let rows: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    let Some(Value::Object(first)) = rows.first() else {
        println!("(none)");
        return;
    };
    let cols: Vec<&String> = first.keys().collect();
    let cell = |r: &Value, c: &str| match r.get(c) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(x) => x.to_string(),
    };
    let widths: Vec<usize> = cols
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(cols.iter().map(|c| c.to_uppercase()).collect()));
    for r in &rows {
        println!("{}", line(cols.iter().map(|c| cell(r, c)).collect()));
    }
}
