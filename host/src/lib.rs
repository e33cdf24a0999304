//! segwlb: an L2 (transparent) IPsec tunnel load balancer with balancing
//! policies as WebAssembly components. See ARCHITECTURE.md for the map.

pub mod authoring;
pub mod balancer;
pub mod check;
pub mod compare;
pub mod control;
pub mod dataplane;
pub mod io;
pub mod lab;
pub mod packet;
pub mod pair;
pub mod policy;
pub mod run;
pub mod time;
mod toml_at;
pub mod units;
pub mod workload;
