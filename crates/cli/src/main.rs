//! # openims
//!
//! The single binary: `serve` runs the service, `admin` manages identities directly on the
//! data directory, `image` inspects and converts image files locally, `usage` is a client of a
//! running service (AK/SK-signed). It owns configuration
//! (flags, `OPENIMS_*` environment variables, `openims.toml`), logging and process lifecycle;
//! everything else is done by the library crates.

mod admin;
mod client;
mod config;
mod image_cmd;
mod serve;
mod share_cmd;
mod transfer;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "openims",
    version,
    about = "OpenIMS: a self-hosted image management service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (API, workers) on a data directory.
    Serve(config::ServeArgs),
    /// Manage domains, projects, users and keys on a data directory.
    Admin(admin::AdminArgs),
    /// Inspect and convert image files locally; share images through a running service.
    Image(image_cmd::ImageArgs),
    /// Storage usage of a project (logical vs billable bytes), from a running service.
    Usage(client::UsageArgs),
    /// Move an image between two sites through their buckets (export, download, upload,
    /// register), resumably and verified end to end.
    Transfer(Box<transfer::TransferArgs>),
    /// Asynchronous jobs of a running service.
    Job(client::JobArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Admin(args) => admin::run(args),
        Command::Image(args) => image_cmd::run(args),
        Command::Usage(args) => client::usage(args),
        Command::Transfer(args) => transfer::run(*args),
        Command::Job(args) => client::job(args),
    }
}
