//! What a path that is not a regular file is, in words, for the messages of the places that
//! refuse to read one (a tile named like one but a FIFO or a device, a cache pack that is a
//! symbolic link): "a FIFO", "a character device", ...

use std::fs::FileType;
use std::os::unix::fs::FileTypeExt;

/// `t` in words, with its article: "a regular file", "a symbolic link", "a directory",
/// "a FIFO", "a socket", "a block device", "a character device".
pub fn describe(t: FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else {
        "a special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_in_words() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("l");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        let kind =
            |p: &std::path::Path| describe(std::fs::symlink_metadata(p).unwrap().file_type());
        assert_eq!(kind(d.path()), "a directory");
        assert_eq!(kind(&link), "a symbolic link");
        assert_eq!(
            kind(std::path::Path::new("/dev/null")),
            "a character device"
        );
        std::fs::write(d.path().join("f"), b"").unwrap();
        assert_eq!(kind(&d.path().join("f")), "a regular file");
    }
}
