//! Dalil delivers correspondence from state bodies to citizens and businesses and records
//! every step as evidence a court can rely on.
//!
//! A tour, in the order an item travels:
//!
//! - [`api`] — the HTTP API. An agency's submission is parsed at the edge into [`domain`]
//!   types, rendered with [`templates`] and committed in one transaction with its evidence
//!   and its [`outbox`] rows.
//! - [`outbox`] — the relay publishes outbox rows to RabbitMQ ([`queue`]) with publisher
//!   confirms.
//! - [`worker`] — consumes a channel's queue and hands each attempt to a [`channels`]
//!   adapter (the portal inbox today), recording the result in one transaction before the ack.
//! - [`evidence`] — the append-only log of RFC 8785 canonical records, ETSI EN 319 522 events.
//! - [`policy`] — per kind: which channels, and what makes an item legally served.
//! - [`identity`] — citizens' tokens from the national identity provider.
//! - [`admin`], [`cli`], [`app`], [`config`], [`db`] — operating it.

pub mod admin;
pub mod api;
pub mod app;
pub mod bench;
pub mod bench_log;
pub mod callbacks;
pub mod channels;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod domain;
pub mod evidence;
pub mod group;
pub mod identity;
pub mod jcs;
pub mod letter;
pub mod log;
pub mod merkle;
pub mod note;
pub mod outbox;
pub mod policy;
pub mod proof;
pub mod queue;
pub mod scheduler;
pub mod sim;
pub mod sms;
pub mod templates;
pub mod timers;
pub mod web;
pub mod worker;
