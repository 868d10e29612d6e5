//! Black-box tests of Dalil against real PostgreSQL and RabbitMQ.

mod admin;
mod bad_input;
mod faults;
mod helpers;
mod idempotency;
mod operations;
mod proof;
mod submission;
mod tenancy;
