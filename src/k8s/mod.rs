//! Kubernetes types shared by the Kubernetes engine, the installer and the controller.

pub mod cluster;
pub mod crd;
pub mod described;
pub mod throttle;
