//! A small, safe Python-pickle reader: just enough to read PyTorch `torch.save` state dicts.
//!
//! It never executes anything: globals are recorded by name, and only the reconstructors that
//! state dicts use (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`) are interpreted, by the caller, from the resulting
//! [`Value`] tree. Persistent ids (PyTorch's storage references) are returned as
//! [`Value::PersId`] for the caller to resolve. Protocols 2 to 5 are covered.

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `module.name`, as GLOBAL / STACK_GLOBAL name it.
    Global(String),
    /// A REDUCE or NEWOBJ: callable applied to an argument tuple (not executed).
    Call(Box<Value>, Box<Value>),
    PersId(Box<Value>),
    /// An object with BUILD state applied (not executed).
    Build(Box<Value>, Box<Value>),
    Mark,
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    pub fn as_tuple(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.pos + n > self.data.len() {
            bail!("pickle truncated at byte {}", self.pos);
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn line(&mut self) -> Result<&'a str> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        if self.pos >= self.data.len() {
            bail!("pickle truncated in a text line");
        }
        let s = std::str::from_utf8(&self.data[start..self.pos])?;
        self.pos += 1;
        Ok(s)
    }
}

fn long_from_le(bytes: &[u8]) -> Result<i64> {
    if bytes.is_empty() {
        return Ok(0);
    }
    if bytes.len() > 8 {
        // Larger than i64: only the legacy magic number is that large; keep its low 64 bits.
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[..8]);
        return Ok(i64::from_le_bytes(b));
    }
    let neg = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut b = if neg { [0xffu8; 8] } else { [0u8; 8] };
    b[..bytes.len()].copy_from_slice(bytes);
    Ok(i64::from_le_bytes(b))
}

/// Parse one pickle starting at `data[*pos]`; on return `*pos` is just after its STOP opcode.
pub fn parse(data: &[u8], pos: &mut usize) -> Result<Value> {
    let mut r = Reader { data, pos: *pos };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: std::collections::HashMap<u32, Value> = std::collections::HashMap::new();
    let pop = |stack: &mut Vec<Value>| stack.pop().context("pickle stack underflow");
    let pop_mark = |stack: &mut Vec<Value>| -> Result<Vec<Value>> {
        let m = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .context("pickle MARK not found")?;
        let items = stack.split_off(m + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.u64()?; // FRAME
            }
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            b'J' => stack.push(Value::Int(r.u32()? as i32 as i64)),
            0x8a => {
                let n = r.u8()? as usize;
                stack.push(Value::Int(long_from_le(r.take(n)?)?));
            }
            0x8b => {
                let n = r.u32()? as usize;
                stack.push(Value::Int(long_from_le(r.take(n)?)?));
            }
            b'G' => {
                let b: [u8; 8] = r.take(8)?.try_into()?;
                stack.push(Value::Float(f64::from_be_bytes(b)));
            }
            b'I' => {
                let l = r.line()?;
                stack.push(match l {
                    "01" => Value::Bool(true),
                    "00" => Value::Bool(false),
                    _ => Value::Int(l.parse().context("pickle INT")?),
                });
            }
            b'L' => {
                let l = r.line()?.trim_end_matches('L');
                stack.push(Value::Int(l.parse().context("pickle LONG")?));
            }
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(String::from_utf8(r.take(n)?.to_vec())?));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(String::from_utf8(r.take(n)?.to_vec())?));
            }
            0x8d => {
                let n = r.u64()? as usize;
                stack.push(Value::Str(String::from_utf8(r.take(n)?.to_vec())?));
            }
            b'T' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()));
            }
            b'U' => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()));
            }
            b'B' => {
                let n = r.u32()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            0x8e => {
                let n = r.u64()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(format!("{module}.{name}")));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(format!("{m}.{n}"))),
                    _ => bail!("pickle STACK_GLOBAL with non-string names"),
                }
            }
            b'q' => {
                let k = r.u8()? as u32;
                memo.insert(
                    k,
                    stack
                        .last()
                        .context("pickle BINPUT on empty stack")?
                        .clone(),
                );
            }
            b'r' => {
                let k = r.u32()?;
                memo.insert(
                    k,
                    stack
                        .last()
                        .context("pickle LONG_BINPUT on empty stack")?
                        .clone(),
                );
            }
            0x94 => {
                let k = memo.len() as u32;
                memo.insert(
                    k,
                    stack
                        .last()
                        .context("pickle MEMOIZE on empty stack")?
                        .clone(),
                );
            }
            b'h' => {
                let k = r.u8()? as u32;
                stack.push(
                    memo.get(&k)
                        .context("pickle BINGET of unknown memo")?
                        .clone(),
                );
            }
            b'j' => {
                let k = r.u32()?;
                stack.push(
                    memo.get(&k)
                        .context("pickle LONG_BINGET of unknown memo")?
                        .clone(),
                );
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85 => {
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a]));
            }
            0x86 => {
                let b = pop(&mut stack)?;
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a, b]));
            }
            0x87 => {
                let c = pop(&mut stack)?;
                let b = pop(&mut stack)?;
                let a = pop(&mut stack)?;
                stack.push(Value::Tuple(vec![a, b, c]));
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                // An OrderedDict() is just a dict to us; SETITEMS then fills it.
                if matches!(&func, Value::Global(g) if g == "collections.OrderedDict") {
                    stack.push(Value::Dict(Vec::new()));
                } else {
                    stack.push(Value::Call(Box::new(func), Box::new(args)));
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(Value::PersId(Box::new(pid)));
            }
            b'b' => {
                let state = pop(&mut stack)?;
                let obj = pop(&mut stack)?;
                // Dicts carry `_metadata` as BUILD state: irrelevant to the tensors.
                if matches!(obj, Value::Dict(_)) {
                    stack.push(obj);
                } else {
                    stack.push(Value::Build(Box::new(obj), Box::new(state)));
                }
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => bail!("pickle SETITEM on a non-dict"),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => bail!("pickle SETITEMS on a non-dict"),
                }
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => bail!("pickle APPEND on a non-list"),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => bail!("pickle APPENDS on a non-list"),
                }
            }
            b'.' => {
                *pos = r.pos;
                return pop(&mut stack);
            }
            other => bail!(
                "unsupported pickle opcode 0x{other:02x} at byte {} (not a plain state dict?)",
                r.pos - 1
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_protocol2_dict() {
        // pickle.dumps({'a': 1, 'b': (2.5, None, True)}, protocol=2)
        let data: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02G@\x04\x00\x00\x00\x00\x00\x00N\x88\x87q\x03u.";
        let mut pos = 0;
        let v = parse(data, &mut pos).unwrap();
        assert_eq!(pos, data.len());
        assert_eq!(
            v,
            Value::Dict(vec![
                (Value::Str("a".into()), Value::Int(1)),
                (
                    Value::Str("b".into()),
                    Value::Tuple(vec![Value::Float(2.5), Value::None, Value::Bool(true)])
                ),
            ])
        );
    }

    #[test]
    fn truncated_pickle_is_an_error() {
        let data: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00";
        assert!(parse(data, &mut 0).is_err());
    }

    #[test]
    fn negative_long1() {
        assert_eq!(long_from_le(&[0xff]).unwrap(), -1);
        assert_eq!(long_from_le(&[0x00, 0x01]).unwrap(), 256);
    }
}
