//! Integration tests of braid-store-postgres, on a real PostgreSQL that
//! `scripts/postgres.sh up` starts (installing it if need be); each test
//! gets a database of its own.

mod conformance;
mod postgres;
mod support;
