//! Black-box tests of Dalil against real PostgreSQL and RabbitMQ.

mod admin;
mod bad_input;
mod batch;
mod bench;
mod browser;
mod callbacks;
mod demo;
mod faults;
mod group_commit;
mod helpers;
mod idempotency;
mod lanes;
mod notices;
mod operations;
mod policies;
mod postal;
mod proof;
mod smtp;
mod submission;
mod tenancy;
mod web;
