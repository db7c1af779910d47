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
 * object is written to a temporary file and renamed into place (also atomic against a crash), and
 * every request on one key -- PUT, DELETE, GET, HEAD -- runs alone, the GET's body read in full.
 *
 * Usage: node embedded_s3_server.js --directory DIR --address 127.0.0.1 --port N --bucket NAME
 */
const path = require('path');

function requireS3rver() {
  const candidates = [process.env.TRIALSYNC_S3RVER_MODULE, path.join(__dirname, '..', 'node_modules', 's3rver'), 's3rver'];
  for (const c of candidates) {
    if (!c) continue;
    try {
      return require(c);
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
  silent: true,
  configureBuckets: [{ name: bucket, configs: [] }],
});

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

const fsp = require('fs').promises;
const crypto = require('crypto');

async function readAll(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return Buffer.concat(chunks);
}

server.store.putObject = async function putObject(object) {
  const objectPath = this.getResourcePath(object.bucket, object.key, 'object');
  await fsp.mkdir(path.dirname(objectPath), { recursive: true });
  const content = Buffer.isBuffer(object.content) ? object.content : await readAll(object.content);
  const md5 = crypto.createHash('md5').update(content).digest('hex');
  const tmp = `${objectPath}.tmp-${process.pid}-${crypto.randomBytes(6).toString('hex')}`;
  await fsp.writeFile(tmp, content);
  await fsp.rename(tmp, objectPath);
  await this.putMetadata(object.bucket, object.key, object.metadata, md5);
  return { size: content.length, md5 };
};

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
      const exists = await server.store.existsObject(bucket, key);
      if (ifNoneMatch === '*' && exists) return preconditionFailed(ctx);
      if (ifMatch) {
        if (!exists) return preconditionFailed(ctx);
        const meta = await server.store.getMetadata(bucket, key);
        if (ifMatch !== '*' && bare(meta && meta.etag) !== bare(ifMatch)) return preconditionFailed(ctx);
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
