//! `openims serve`: opens the service, creates the first identities on first start, serves
//! the API and the embedded S3-compatible bucket endpoint (its own port) on one runtime, runs
//! job workers, and shuts down gracefully on SIGTERM or Ctrl-C (both listeners stop accepting,
//! in-flight requests finish, then the workers stop).

use crate::config::{resolve_serve, Listen, ServeArgs};
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=info,s3s=off")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(cfg: openims_core::ServiceConfig, listen: Listen) -> anyhow::Result<()> {
    // Signal handlers first: from the moment the port accepts connections, SIGTERM means a
    // graceful stop.
    let shutdown = shutdown_signal()?;
    let api_addr = listen.api.clone();
    let listener = tokio::net::TcpListener::bind(&api_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {api_addr}: {e}"))?;
    let s3_listener = match &listen.s3 {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {a} (S3 endpoint): {e}"))?,
        ),
        None => None,
    };
    let s3_endpoint = match &s3_listener {
        Some(l) => Some(format!("http://{}", l.local_addr()?)),
        None => None,
    };
    let svc = Service::open(cfg.clone()).await?;
    svc.xr.set_link(std::sync::Arc::new(
        openims_api::peer::HttpPeerLink::default(),
    ));
    if let Some(b) = svc.db.bootstrap_once(&svc.node_id).await? {
        let path = cfg.data_dir.join("credentials");
        let text = format!(
            "OPENIMS_ENDPOINT={endpoint}\nOPENIMS_REGION={region}\nOPENIMS_DOMAIN={dname}\nOPENIMS_DOMAIN_ID={did}\n\
             OPENIMS_PROJECT={pname}\nOPENIMS_PROJECT_ID={pid}\nOPENIMS_USER={user}\nOPENIMS_PASSWORD={pw}\n\
             OPENIMS_ACCESS_KEY={ak}\nOPENIMS_SECRET_KEY={sk}\n{s3}",
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
            s3 = s3_endpoint
                .as_ref()
                .map(|e| format!("OPENIMS_S3_ENDPOINT={e}\n"))
                .unwrap_or_default(),
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
             --os-project-name default --os-user-domain-name default --os-project-domain-name default image list{s3}",
            pid = b.project.id,
            path = path.display(),
            endpoint = cfg.public_endpoint,
            s3 = s3_endpoint
                .as_ref()
                .map(|e| format!(
                    "\n  S3 buckets (aws CLI, boto3; AWS SigV4 with the same AK/SK, region {region}, path-style): \
                     AWS_ACCESS_KEY_ID=$OPENIMS_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$OPENIMS_SECRET_KEY \
                     aws --endpoint-url {e} --region {region} s3 ls",
                    region = cfg.region
                ))
                .unwrap_or_default(),
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let gc = svc.spawn_gc(stop_rx.clone());
    let workers = svc.spawn_workers(cfg.workers, stop_rx);
    let app = openims_api::router(svc.clone());
    tracing::info!(listen = %api_addr, s3 = s3_endpoint.as_deref().unwrap_or("off"), region = %cfg.region, data_dir = %cfg.data_dir.display(), "openims is serving");
    // One signal stops both listeners.
    let (shut_tx, shut_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let api = axum::serve(listener, app).with_graceful_shutdown(stopped(shut_rx.clone()));
    let s3 = async {
        match s3_listener {
            Some(l) => {
                axum::serve(l, openims_api::s3::router(svc.clone()))
                    .with_graceful_shutdown(stopped(shut_rx.clone()))
                    .await
            }
            None => Ok(()),
        }
    };
    let signal = async {
        shutdown.await;
        let _ = shut_tx.send(true);
        Ok::<(), std::io::Error>(())
    };
    tokio::try_join!(async { api.await }, s3, signal)?;
    tracing::info!("shutting down: waiting for workers to stop");
    let _ = stop_tx.send(true);
    for w in workers.into_iter().chain(gc) {
        let _ = w.await;
    }
    svc.db.pool.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGINT and SIGTERM handlers, registered when this is called (before the listener answers
/// anything, so a signal sent as soon as `/healthz` says ready is never lost to the default
/// action); the future completes on the first of them.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
