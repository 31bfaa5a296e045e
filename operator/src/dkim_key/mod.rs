//! DkimKey controller: generates keys into owned Secrets and walks them through
//! the rotation in [`rotation`].

pub mod keygen;
pub mod reconcile;
pub mod rotation;
