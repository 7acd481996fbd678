//! The offline inbox store (src/inbox/): one contract suite, run against the memory backend
//! and against real PostgreSQL (a fresh database per test), plus PostgreSQL's own failure
//! cases (connections killed idle and mid-stream).

mod contract;
mod pg;
mod postgres;
