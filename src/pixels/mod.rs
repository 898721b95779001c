//! Tile bytes to the network's pixels, exactly as the tutorial's OpenCV calls make them:
//! [`decode`] (`cv2.imread`) then [`resize`] (`cv2.resize`, INTER_LINEAR), u8 RGB throughout.
//! Every path here is held to OpenCV bit for bit (see ARCHITECTURE.md, "Pixels are OpenCV's").

pub mod decode;
pub mod resize;

pub use decode::decode_rgb;
pub use resize::{resize_linear, Image};
