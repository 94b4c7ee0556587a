//! The harness: network namespaces ([`net`]), server processes
//! ([`cluster`]), the workload ([`workload`], with Subscribe readers in
//! [`subscriber`]), the nemesis ([`nemesis`]; node-set changes in
//! [`membership`]),
//! the history recorder ([`recorder`]) and the scenario loop ([`run`]).

pub mod cluster;
pub mod corrupt;
pub mod membership;
pub mod nemesis;
pub mod net;
pub mod recorder;
pub mod run;
pub mod subscriber;
pub mod workload;
