//! `openims serve`: opens the service, creates the first identities on first start, serves
//! the API, runs job workers, and shuts down gracefully on SIGTERM or Ctrl-C.

use crate::config::{resolve_serve, ServeArgs};
use openims_core::Service;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(&args.log_format);
    let (cfg, listen) = resolve_serve(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(cfg, listen))
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(cfg: openims_core::ServiceConfig, listen: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let svc = Service::open(cfg.clone()).await?;
    if let Some(b) = svc.db.bootstrap().await? {
        let path = cfg.data_dir.join("credentials");
        let text = format!(
            "OPENIMS_ENDPOINT={endpoint}\nOPENIMS_REGION={region}\nOPENIMS_DOMAIN={dname}\nOPENIMS_DOMAIN_ID={did}\n\
             OPENIMS_PROJECT={pname}\nOPENIMS_PROJECT_ID={pid}\nOPENIMS_USER={user}\nOPENIMS_PASSWORD={pw}\n\
             OPENIMS_ACCESS_KEY={ak}\nOPENIMS_SECRET_KEY={sk}\n",
            endpoint = cfg.public_endpoint,
            region = cfg.region,
            dname = b.domain.name,
            did = b.domain.id,
            pname = b.project.name,
            pid = b.project.id,
            user = b.user.name,
            pw = b.password,
            ak = b.key.access_key,
            sk = b.key.secret_key.clone().unwrap_or_default(),
        );
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        println!(
            "First start: created domain 'default', project 'default' ({pid}) and user 'admin'.\n\
             Credentials (AK/SK, password) are in {path} (mode 0600). To use them:\n  \
             set -a; . {path}; set +a\n  \
             Huawei Cloud SDK: BasicCredentials($OPENIMS_ACCESS_KEY, $OPENIMS_SECRET_KEY, $OPENIMS_PROJECT_ID), endpoint {endpoint}\n  \
             OpenStack CLI: openstack --os-auth-url {endpoint}/v3 --os-username admin --os-password \"$OPENIMS_PASSWORD\" \
             --os-project-name default --os-user-domain-name default --os-project-domain-name default image list",
            pid = b.project.id,
            path = path.display(),
            endpoint = cfg.public_endpoint,
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let gc = svc.spawn_gc(stop_rx.clone());
    let workers = svc.spawn_workers(cfg.workers, stop_rx);
    let app = openims_api::router(svc.clone());
    tracing::info!(listen = %listen, region = %cfg.region, data_dir = %cfg.data_dir.display(), "openims is serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("shutting down: waiting for workers to stop");
    let _ = stop_tx.send(true);
    for w in workers.into_iter().chain(gc) {
        let _ = w.await;
    }
    svc.db.pool.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
