'use strict';
/*
 * s3rver (npm, pinned in package.json) with conditional PUTs, for the durable embedded broker.
 *
 * Why: tansu's object-store engine creates objects with `If-None-Match: *` and updates them with
 * `If-Match: <etag>`, and relies on the 412 answer. s3rver 3.7 ignores both headers on PUT, so at
 * every broker start tansu's "create the partition watermark if absent" overwrote the real one with
 * 0 and the next records overwrote offset 0 onwards (seen: 50 records acknowledged before a restart
 * were replaced by the next 50). This wrapper answers 412 PreconditionFailed as S3 does.
 *
 * s3rver also answers a PUT before the file is fully written (it resolves on its hashing stream's
 * 'finish', not the file's), so a GET right after read half an object (tansu: "EOF while parsing a
 * string" on a partition watermark, produce requests failing under concurrent producers). Here an
 * object is written completely before the answer, and every request on one key -- PUT, DELETE,
 * GET, HEAD -- runs alone, the GET's body read in full.
 *
 * Usage: node embedded_s3_server.js --directory DIR --address 127.0.0.1 --port N --bucket NAME
 */
const path = require('path');

let s3rverPath = null;

function requireS3rver() {
  const candidates = [process.env.TRIALSYNC_S3RVER_MODULE, path.join(__dirname, '..', 'node_modules', 's3rver'), 's3rver'];
  for (const c of candidates) {
    if (!c) continue;
    try {
      const mod = require(c);
      s3rverPath = c;
      return mod;
    } catch (err) {
      if (err.code !== 'MODULE_NOT_FOUND') throw err;
    }
  }
  throw new Error('s3rver is not installed: run `make install` (npm ci)');
}

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const S3rver = requireS3rver();
const bucket = arg('bucket', 'tansu');
const server = new S3rver({
  directory: arg('directory'),
  address: arg('address', '127.0.0.1'),
  port: Number(arg('port', '4568')),
  silent: process.env.TRIALSYNC_S3_LOG !== '1', // TRIALSYNC_S3_LOG=1: one log line per request
  configureBuckets: [{ name: bucket, configs: [] }],
});

if (process.env.TRIALSYNC_S3_LOG !== '1') {
  // s3rver formats a winston log entry for every request even when silent (koa-logger + colorize +
  // splat): a no-op logger and no request logger take several milliseconds off every request
  const noop = () => {};
  const quiet = { info: noop, warn: noop, error: noop, debug: noop, log: noop, close: noop,
                  exceptions: { unhandle: noop, handle: noop } };
  server.logger = server.context.logger = quiet;
  server.middleware.splice(0, 1); // koa-logger, the first middleware s3rver installs
}

const tails = new Map(); // key -> promise of the last queued write

async function withKeyLock(key, fn) {
  const prev = tails.get(key) || Promise.resolve();
  let release;
  const mine = new Promise((resolve) => { release = resolve; });
  const tail = prev.then(() => mine);
  tails.set(key, tail);
  await prev;
  try {
    return await fn();
  } finally {
    release();
    if (tails.get(key) === tail) tails.delete(key);
  }
}

const fs = require('fs');
const crypto = require('crypto');

async function readAll(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return Buffer.concat(chunks);
}

// How objects are stored (same files as s3rver's own FilesystemStore, so its listing and reads keep
// working) is tuned to what tansu does: every produce request of an idempotent producer waits for
// three sequential PUTs (producer state, partition watermark, record batch), two of them
// overwriting a small existing object. On ext4, replacing a file's content by truncating or by
// renaming over it makes the kernel flush the data first (auto_da_alloc), ~1.5-3.5 ms each here;
// s3rver's three files per PUT made a produce take ~16 ms instead of well under one. So:
// * an existing object is overwritten in place (write at offset 0, then cut to the new length);
// * a new object is one file: its md5 (the ETag) is kept in memory and computed from the content
//   when not known, and a metadata file is written only for non-default metadata;
// * synchronous calls: the objects are small and in the page cache, no thread-pool round trips.
// Readers never see a half-written object: every request on a key runs alone (withKeyLock below).
// Killed between the write and the cut, an overwritten object could keep a stale tail: a kill -9
// of this store (not of the broker) is the one crash that is not atomic.
const S3Object = require(path.join(path.dirname(require.resolve(s3rverPath)), 'models', 'object'));
const { pick, pickBy } = require(require.resolve('lodash', { paths: [path.dirname(require.resolve(s3rverPath))] }));
const knownDirs = new Set();
const etags = new Map(); // object file -> { size, mtimeMs, md5 }

function writeInPlace(file, data) {
  let fd;
  try {
    fd = fs.openSync(file, 'r+');
  } catch (err) {
    if (err.code !== 'ENOENT') throw err;
    fs.writeFileSync(file, data);
    return;
  }
  try {
    fs.writeSync(fd, data, 0, data.length, 0);
    fs.ftruncateSync(fd, data.length);
  } finally {
    fs.closeSync(fd);
  }
}

function md5Of(buf) {
  return crypto.createHash('md5').update(buf).digest('hex');
}

function etagOf(objectPath, st) {
  const known = etags.get(objectPath);
  if (known && known.size === st.size && known.mtimeMs === st.mtimeMs) return known.md5;
  let md5;
  try {
    md5 = fs.readFileSync(`${objectPath}.md5`, 'utf8').trim(); // written by s3rver itself (older data)
  } catch (err) {
    if (err.code !== 'ENOENT') throw err;
    md5 = md5Of(fs.readFileSync(objectPath));
  }
  etags.set(objectPath, { size: st.size, mtimeMs: st.mtimeMs, md5 });
  return md5;
}

server.store.putObject = async function putObject(object) {
  const objectPath = this.getResourcePath(object.bucket, object.key, 'object');
  const dir = path.dirname(objectPath);
  if (!knownDirs.has(dir)) {
    fs.mkdirSync(dir, { recursive: true });
    knownDirs.add(dir);
  }
  const content = Buffer.isBuffer(object.content) ? object.content : await readAll(object.content);
  const md5 = md5Of(content);
  writeInPlace(objectPath, content);
  if (fs.existsSync(`${objectPath}.md5`)) writeInPlace(`${objectPath}.md5`, Buffer.from(md5));
  const meta = {
    ...pick(object.metadata, S3Object.ALLOWED_METADATA),
    ...pickBy(object.metadata, (value, key) => key.startsWith('x-amz-meta-')),
  };
  const metaPath = this.getResourcePath(object.bucket, object.key, 'metadata.json');
  const plain = Object.entries(meta).every(([k, v]) => k === 'content-type' && v === 'binary/octet-stream');
  if (!plain || fs.existsSync(metaPath)) writeInPlace(metaPath, Buffer.from(JSON.stringify(plain ? {} : meta)));
  const st = fs.statSync(objectPath);
  etags.set(objectPath, { size: st.size, mtimeMs: st.mtimeMs, md5 });
  return { size: content.length, md5 };
};

server.store.getMetadata = async function getMetadata(bucket, key) {
  const objectPath = this.getResourcePath(bucket, key, 'object');
  const st = fs.statSync(objectPath); // ENOENT when there is no such object, as s3rver's own
  let stored;
  try {
    stored = JSON.parse(fs.readFileSync(this.getResourcePath(bucket, key, 'metadata.json'), 'utf8'));
  } catch (err) {
    if (err.code !== 'ENOENT') throw err;
  }
  return { ...stored, etag: JSON.stringify(etagOf(objectPath, st)), 'last-modified': st.mtime.toUTCString(),
           'content-length': st.size };
};

const baseDelete = server.store.deleteObject.bind(server.store);
server.store.deleteObject = async function deleteObject(bucket, key) {
  etags.delete(this.getResourcePath(bucket, key, 'object'));
  return baseDelete(bucket, key);
};

function currentEtag(key) {
  const objectPath = server.store.getResourcePath(bucket, key, 'object');
  try {
    return etagOf(objectPath, fs.statSync(objectPath));
  } catch (err) {
    if (err.code === 'ENOENT') return null;
    throw err;
  }
}

const bare = (etag) => String(etag || '').replace(/^W\//, '').replace(/"/g, '');

function preconditionFailed(ctx) {
  ctx.status = 412;
  ctx.type = 'application/xml';
  ctx.body = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PreconditionFailed</Code>' +
    '<Message>At least one of the pre-conditions you specified did not hold</Message></Error>';
}

server.middleware.unshift(async (ctx, next) => {
  const prefix = `/${bucket}/`;
  const isObject = ctx.path.startsWith(prefix) && ctx.path.length > prefix.length;
  if (!isObject || ctx.headers['x-amz-copy-source'] || ctx.query.uploadId || ctx.query.partNumber) {
    return next();
  }
  const key = decodeURIComponent(ctx.path.slice(prefix.length));
  return withKeyLock(key, async () => {
    const ifNoneMatch = ctx.headers['if-none-match'];
    const ifMatch = ctx.headers['if-match'];
    if (ctx.method === 'PUT' && (ifNoneMatch || ifMatch)) {
      const etag = currentEtag(key); // null: no such object
      if (ifNoneMatch === '*' && etag !== null) return preconditionFailed(ctx);
      if (ifMatch && (etag === null || (ifMatch !== '*' && bare(etag) !== bare(ifMatch)))) {
        return preconditionFailed(ctx);
      }
    }
    await next();
    if (ctx.method === 'GET' && ctx.body && typeof ctx.body.pipe === 'function') {
      ctx.body = await readAll(ctx.body); // read under the key's lock: never a half-replaced object
    }
  });
});

server.run().then(({ address, port }) => {
  process.stdout.write(`embedded S3 store listening on ${address}:${port}\n`);
}).catch((err) => {
  process.stderr.write(`embedded S3 store failed to start: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref(); // a client still connected must not hold `stack down`
  });
}
