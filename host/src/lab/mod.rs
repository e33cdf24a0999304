//! Network-namespace plumbing shared by the live tests, the throughput
//! benchmark and `segwlb lab`: namespaces and veth pairs that clean up after
//! themselves, and running code inside a namespace.

pub mod netns;
