//! End-to-end tests of the session pool with real Python workers. Waits are on pool state
//! changes ([`capsule_pool::SessionPool::wait_until`]) and outcomes; time limits are only
//! guards against hangs, never assertions.

mod support;

mod acceptance;
mod breaker;
mod confined;
mod fork;
mod hygiene;
mod lifecycle;
mod sharing;
