/**
 * Why `url` cannot be a PostgreSQL connection URL, or undefined when it can. pg itself takes any text (a
 * `mysql://` URL or a typo becomes a connection to some host): refused here, when the backbone is made.
 * The message never repeats the URL, which may hold a password.
 */
export function urlProblem(url: unknown): string | undefined {
  const example = 'for example postgres://user:password@host:5432/database';
  if (typeof url !== 'string' || url.trim() === '') return `url must be a PostgreSQL connection URL, ${example}`;
  if (url.startsWith('/')) return undefined; // a Unix socket directory, as pg takes it
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(url)?.[1]?.toLowerCase();
  if (scheme === undefined) return `url is not a URL: it must start with postgres:// or postgresql://, ${example}`;
  if (scheme !== 'postgres' && scheme !== 'postgresql' && scheme !== 'socket')
    return `url must be a PostgreSQL URL (postgres:// or postgresql://), not ${scheme}://; ${example}`;
  // A URL with no host (the socket given as ?host=/var/run/postgresql) is valid for pg, not for URL.
  if (!URL.canParse(url) && !URL.canParse(url.replace('@/', '@localhost/'))) {
    return `url cannot be parsed as a URL: percent-encode special characters in the user name and password (encodeURIComponent), ${example}`;
  }
  return undefined;
}

/** `postgres://user@host:port/db`, without the password. */
export function describeUrl(url: string | undefined, config: Record<string, unknown> = {}): string {
  if (url !== undefined) {
    try {
      const parsed = new URL(url);
      parsed.password = '';
      return parsed.toString().replace(/:@/, '@');
    } catch {
      return 'the configured URL (unparseable)';
    }
  }
  const host = String(config.host ?? process.env.PGHOST ?? 'localhost');
  const port = String(config.port ?? process.env.PGPORT ?? 5432);
  const database = String(config.database ?? process.env.PGDATABASE ?? '');
  const user = String(config.user ?? process.env.PGUSER ?? '');
  return `postgres://${user ? `${user}@` : ''}${host}:${port}/${database}`;
}
