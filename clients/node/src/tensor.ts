// tensafe.api.common.v1.Tensor on the wire: a dtype, a shape (outermost first; empty for a scalar) and the
// elements in row-major order, little-endian, no padding: data.length == product(shape) * itemsize(dtype).
// Written and read here with DataView and explicit little-endian offsets, so the bytes are the same on any
// host. int64 elements are bigint; float16 and bfloat16 are converted to and from JavaScript numbers.
import { create } from "@bufbuild/protobuf";
import { Dtype, TensorSchema, type Tensor } from "./gen/tensafe/api/common/v1/common_pb.js";

/** Bytes per element. */
export const ITEMSIZE: Readonly<Record<number, number>> = {
  [Dtype.FLOAT32]: 4,
  [Dtype.FLOAT16]: 2,
  [Dtype.BFLOAT16]: 2,
  [Dtype.FLOAT64]: 8,
  [Dtype.INT64]: 8,
  [Dtype.INT32]: 4,
  [Dtype.INT8]: 1,
  [Dtype.UINT8]: 1,
  [Dtype.BOOL]: 1,
};

/** What one element is in JavaScript for a dtype. */
export type Element = number | bigint | boolean;

/** A nested array of elements, e.g. number[][] or bigint[][] (rows outermost). */
export type Nested = Element | readonly Nested[];

function itemsize(dtype: Dtype): number {
  const size = ITEMSIZE[dtype];
  if (size === undefined) {
    throw new RangeError(`dtype ${Dtype[dtype] ?? dtype} has no wire encoding`);
  }
  return size;
}

function product(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Shape of a rectangular nested array; a ragged one is refused. */
export function shapeOf(values: Nested): number[] {
  const shape: number[] = [];
  let level: Nested = values;
  while (Array.isArray(level)) {
    shape.push(level.length);
    if (level.length === 0) break;
    level = (level as readonly Nested[])[0] as Nested;
  }
  const check = (v: Nested, depth: number): void => {
    if (depth === shape.length) {
      if (Array.isArray(v)) throw new RangeError("ragged nested array: deeper than its first element");
      return;
    }
    if (!Array.isArray(v) || v.length !== shape[depth]) {
      throw new RangeError(`ragged nested array: expected ${shape[depth]} elements at depth ${depth}`);
    }
    for (const item of v as readonly Nested[]) check(item, depth + 1);
  };
  check(values, 0);
  return shape;
}

function flatten(values: Nested, out: Element[] = []): Element[] {
  if (Array.isArray(values)) {
    for (const v of values as readonly Nested[]) flatten(v, out);
  } else {
    out.push(values as Element);
  }
  return out;
}

// IEEE 754 half precision, round to nearest even.
function toFloat16Bits(value: number): number {
  const f32 = new DataView(new ArrayBuffer(4));
  f32.setFloat32(0, value, true);
  const x = f32.getUint32(0, true);
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // inf / nan
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // overflow -> inf
  if (e <= 0) {
    if (e < -10) return sign; // underflow -> 0
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && (half & 1))) half += 1;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1))) half += 1; // a carry into the exponent is still right
  return sign | half;
}

function fromFloat16Bits(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

// bfloat16: the top 16 bits of a float32, round to nearest even.
function toBfloat16Bits(value: number): number {
  const f32 = new DataView(new ArrayBuffer(4));
  f32.setFloat32(0, value, true);
  const x = f32.getUint32(0, true);
  if (Number.isNaN(value)) return 0x7fc0;
  const rounded = x + 0x7fff + ((x >>> 16) & 1);
  return (rounded >>> 16) & 0xffff;
}

function fromBfloat16Bits(b: number): number {
  const f32 = new DataView(new ArrayBuffer(4));
  f32.setUint32(0, b << 16, true);
  return f32.getFloat32(0, true);
}

function write(view: DataView, offset: number, dtype: Dtype, v: Element): void {
  switch (dtype) {
    case Dtype.FLOAT32: view.setFloat32(offset, Number(v), true); return;
    case Dtype.FLOAT64: view.setFloat64(offset, Number(v), true); return;
    case Dtype.FLOAT16: view.setUint16(offset, toFloat16Bits(Number(v)), true); return;
    case Dtype.BFLOAT16: view.setUint16(offset, toBfloat16Bits(Number(v)), true); return;
    case Dtype.INT64: view.setBigInt64(offset, BigInt(v), true); return;
    case Dtype.INT32: view.setInt32(offset, Number(v), true); return;
    case Dtype.INT8: view.setInt8(offset, Number(v)); return;
    case Dtype.UINT8: view.setUint8(offset, Number(v)); return;
    case Dtype.BOOL: view.setUint8(offset, v ? 1 : 0); return;
    default: throw new RangeError(`dtype ${Dtype[dtype] ?? dtype} has no wire encoding`);
  }
}

function read(view: DataView, offset: number, dtype: Dtype): Element {
  switch (dtype) {
    case Dtype.FLOAT32: return view.getFloat32(offset, true);
    case Dtype.FLOAT64: return view.getFloat64(offset, true);
    case Dtype.FLOAT16: return fromFloat16Bits(view.getUint16(offset, true));
    case Dtype.BFLOAT16: return fromBfloat16Bits(view.getUint16(offset, true));
    case Dtype.INT64: return view.getBigInt64(offset, true);
    case Dtype.INT32: return view.getInt32(offset, true);
    case Dtype.INT8: return view.getInt8(offset);
    case Dtype.UINT8: return view.getUint8(offset);
    case Dtype.BOOL: return view.getUint8(offset) !== 0;
    default: throw new RangeError(`dtype ${Dtype[dtype] ?? dtype} has no wire encoding`);
  }
}

/**
 * A Tensor from a rectangular nested array (its shape is the array's) or from flat values and a shape.
 *
 *   tensor(Dtype.INT64, [[1n, 2n, 3n]])            // int64 [1, 3]
 *   tensor(Dtype.FLOAT32, [0.5, 1.5, 2.5, 3.5], [2, 2])
 */
export function tensor(dtype: Dtype, values: Nested, shape?: readonly number[]): Tensor {
  const flat = flatten(values);
  const dims = shape ? [...shape] : shapeOf(values);
  if (dims.some((d) => !Number.isInteger(d) || d < 0)) {
    throw new RangeError(`shape ${JSON.stringify(dims)}: dimensions must be non-negative integers`);
  }
  if (product(dims) !== flat.length) {
    throw new RangeError(`shape ${JSON.stringify(dims)} holds ${product(dims)} elements, not ${flat.length}`);
  }
  const size = itemsize(dtype);
  const data = new Uint8Array(flat.length * size);
  const view = new DataView(data.buffer);
  flat.forEach((v, i) => write(view, i * size, dtype, v));
  return create(TensorSchema, { dtype, shape: dims.map(BigInt), data });
}

/** The elements of a Tensor, flat in row-major order, and its shape; the byte length is checked. */
export function tensorValues(t: Tensor): { shape: number[]; values: Element[] } {
  const shape = t.shape.map(Number);
  const size = itemsize(t.dtype);
  const count = product(shape);
  if (t.data.length !== count * size) {
    throw new RangeError(`tensor of shape ${JSON.stringify(shape)} and ${Dtype[t.dtype]} needs ${count * size} bytes, ` +
      `not ${t.data.length}`);
  }
  const view = new DataView(t.data.buffer, t.data.byteOffset, t.data.byteLength);
  const values: Element[] = [];
  for (let i = 0; i < count; i++) values.push(read(view, i * size, t.dtype));
  return { shape, values };
}

/** The elements of a Tensor as a nested array of its shape (a scalar as the element itself). */
export function tensorToNested(t: Tensor): Nested {
  const { shape, values } = tensorValues(t);
  if (shape.length === 0) return values[0] as Element;
  let index = 0;
  const build = (depth: number): Nested[] => {
    const out: Nested[] = [];
    for (let i = 0; i < (shape[depth] as number); i++) {
      out.push(depth === shape.length - 1 ? (values[index++] as Element) : build(depth + 1));
    }
    return out;
  };
  return build(0);
}
