//! The Weir gRPC API, generated from `proto/` by `build.rs`.
//!
//! One module per protobuf package, named after it (`weir::router::v1`, ...), with messages,
//! clients (`*_service_client`) and servers (`*_service_server`). [`FILE_DESCRIPTOR_SET`] holds the
//! encoded descriptors of every file for gRPC reflection.
#![allow(missing_docs, clippy::all, clippy::pedantic, rust_2018_idioms)]

/// Generated code, one module per protobuf package.
pub mod weir {
    /// `weir.common.v1`: messages shared by every service.
    pub mod common {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("weir.common.v1");
        }
    }
    /// `weir.inference.v1`: model backends.
    pub mod inference {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("weir.inference.v1");
        }
    }
    /// `weir.router.v1`: the front door.
    pub mod router {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("weir.router.v1");
        }
    }
    /// `weir.session.v1`: conversation history.
    pub mod session {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("weir.session.v1");
        }
    }
    /// `weir.budget.v1`: prices, reservations and spend.
    pub mod budget {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("weir.budget.v1");
        }
    }
    /// `weir.review.v1`: human review.
    pub mod review {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("weir.review.v1");
        }
    }
}

pub use weir::{budget::v1 as budget, common::v1 as common, inference::v1 as inference};
pub use weir::{review::v1 as review, router::v1 as router, session::v1 as session};

/// Encoded `FileDescriptorSet` of every Weir proto file, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("weir_descriptor");

/// Fully qualified gRPC service names, as registered with health and reflection.
pub mod service_names {
    /// `weir.inference.v1.InferenceService`.
    pub const INFERENCE: &str = "weir.inference.v1.InferenceService";
    /// `weir.router.v1.RouterService`.
    pub const ROUTER: &str = "weir.router.v1.RouterService";
    /// `weir.router.v1.RouteAdminService`.
    pub const ROUTE_ADMIN: &str = "weir.router.v1.RouteAdminService";
    /// `weir.session.v1.SessionService`.
    pub const SESSION: &str = "weir.session.v1.SessionService";
    /// `weir.budget.v1.BudgetService`.
    pub const BUDGET: &str = "weir.budget.v1.BudgetService";
    /// `weir.review.v1.ReviewService`.
    pub const REVIEW: &str = "weir.review.v1.ReviewService";
}
