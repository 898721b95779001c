pub mod contours;
pub mod mask;
pub mod polygon;
pub mod tissue;
