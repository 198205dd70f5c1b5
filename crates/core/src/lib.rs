//! # openims-core
//!
//! The domain of the image service: identity (domains, projects, users, AK/SK keys, tokens),
//! images and their attributes, tags, quotas, durable jobs and the rules that govern them, and the
//! metadata repository behind them (sqlx over SQLite or PostgreSQL, one schema).
//!
//! It owns every rule of the contract (names, limits, state transitions, who may do what) and
//! expresses violations as [`CoreError`] variants; the api crate maps them to HTTP statuses and
//! `IMG.xxxx` codes in one place. It must not know about HTTP, request signing or wire formats,
//! and it reaches image bytes only through `openims-store` and `openims-format`.
//!
//! Buckets and objects of the embedded S3-compatible endpoint live in [`buckets`] (rules and
//! metadata) and [`objects`] (bytes: streaming writers, positional readers).
//!
//! Every query is scoped by the caller's project: functions that read or change an image take a
//! [`Caller`] and answer `ImageNotFound` for images the caller may not see.

pub mod buckets;
pub mod cluster;
pub mod config;
pub mod crossregion;
pub mod data;
pub mod db;
pub mod error;
pub mod export;
pub mod identity;
pub mod ids;
pub mod image;
pub mod import;
pub mod jobs;
pub mod kms;
pub mod members;
pub mod metering;
pub mod objects;
pub mod reencrypt;
pub mod service;
pub mod sharing;
pub mod tags;
pub mod time;
pub mod upload;

pub use config::ServiceConfig;
pub use error::{CoreError, Result};
pub use identity::Caller;
pub use ids::{DomainId, ImageId, JobId, ProjectId, UserId};
pub use service::Service;
