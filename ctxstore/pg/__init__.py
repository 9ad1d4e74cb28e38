"""PostgreSQL write-behind (design §5.4, docs/postgres.md): the schema's migrations
(``schema``), the rows as Postgres takes them (``rows``), the flusher that runs on each group's
leader (``flusher``), history paged from Postgres (``history``) and the ``ctxstore db``
backfill (``backfill``).  Nothing here runs unless ``postgres_dsn`` is set."""
