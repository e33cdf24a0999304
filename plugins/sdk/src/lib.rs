//! Write a segwlb balancing policy as plain Rust.
//!
//! A policy is a type implementing [`Balance`]: it is configured once from
//! key/value parameters, told the gateway set whenever it changes, and asked
//! for the gateway of each new tunnel, with a read-only view of the live
//! [`Load`]. That is all of it; the decision is an ordinary function with
//! ordinary `#[test]`s.
//!
//! [`export_policy!`] turns such a type into the `segwlb:policy` component
//! when the crate is built for `wasm32`; on any other target it expands to
//! nothing, so the same crate is also the policy's native twin that the host
//! links for differential tests and overhead measurements.
//!
//! This crate must stay free of I/O, clocks and randomness: a policy's answer
//! is a function of its parameters, the gateway set, the load and the key, which is what
//! lets the simulation predict the lab.

pub mod hash;
pub mod load;
mod params;
pub mod table;
mod types;

pub use load::{Empty, GatewayLoad, Load};
pub use params::Params;
pub use types::{Balance, Gateway, Opener, TunnelKey};

pub mod log;

// The starting point `segwlb policy new --lang rust` writes is only text in
// the host's binary: compiled and tested here, against this SDK, so a
// change to the contract cannot leave it broken.
#[cfg(test)]
extern crate self as segwlb_policy_sdk;
#[cfg(test)]
#[path = "../../../host/templates/rust/src/lib.rs"]
mod template;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod guest;

/// Export a [`Balance`] implementation as the policy component.
///
/// ```ignore
/// struct MyPolicy { /* … */ }
/// impl segwlb_policy_sdk::Balance for MyPolicy { /* … */ }
/// segwlb_policy_sdk::export_policy!(MyPolicy);
/// ```
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::guest::wit;

            struct Component;

            ::std::thread_local! {
                static POLICY: $crate::guest::Slot<$policy> = const { $crate::guest::Slot::new() };
            }

            impl wit::Guest for Component {
                fn configure(
                    params: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    POLICY.with(|slot| slot.configure(params))
                }
                fn set_gateways(gateways: ::std::vec::Vec<wit::Gateway>) {
                    POLICY.with(|slot| slot.set_gateways(gateways))
                }
                fn choose(key: wit::TunnelKey) -> ::core::option::Option<u32> {
                    POLICY.with(|slot| slot.choose(key))
                }
            }

    $crate::guest::bindings::export!(Component with_types_in $crate::guest::bindings);
        };
    };
}
