// The pizza bot on grammY, as its documentation builds it: the session plugin on @grammyjs/storage-psql
// over a pg.Pool, served by webhookCallback(bot, "http"). bench/run.py starts it beside our bot and
// sends both the same updates, so every figure is a ratio measured in one run.
//
// Same environment as `python -m bot serve`: DATABASE_URL, WEBHOOK_SECRET, BOT_TOKEN, TELEGRAM_API_ROOT,
// HOST, PORT, DB_POOL_MAX. Nothing here is tuned beyond what a grammY user would write.
"use strict";

const http = require("node:http");
const { Bot, session, webhookCallback } = require("grammy");
const { PsqlAdapter } = require("@grammyjs/storage-psql");
const { Pool } = require("pg");

const PIZZA = "\u{1F355}";

async function main() {
  const env = process.env;
  const pool = new Pool({ connectionString: env.DATABASE_URL, max: Number(env.DB_POOL_MAX || 10) });
  // Its own table: the Python bot's `sessions` has another shape, and each bench run gets a fresh database.
  const storage = await PsqlAdapter.create({ tableName: "grammy_sessions", client: pool });

  const bot = new Bot(env.BOT_TOKEN, { client: { apiRoot: env.TELEGRAM_API_ROOT } });
  await bot.init(); // getMe, once: /hunger@name must know our name

  bot.use(session({ initial: () => ({ pizza_count: 0 }), storage }));
  bot.command("hunger", (ctx) => ctx.reply(`Your hunger level is ${ctx.session.pizza_count}!`));
  bot.on(["message:text", "channel_post:text"], (ctx) => {
    if (ctx.msg.text.includes(PIZZA)) ctx.session.pizza_count += 1;
  });

  const handle = webhookCallback(bot, "http", { secretToken: env.WEBHOOK_SECRET });
  const server = http.createServer((req, res) => {
    if (req.method === "POST" && req.url === "/webhook") return handle(req, res);
    if (req.url === "/readyz" || req.url === "/healthz") {
      return pool.query("SELECT 1").then(
        () => res.writeHead(200).end("ready"),
        (err) => res.writeHead(503).end(String(err)),
      );
    }
    res.writeHead(404).end();
  });
  server.keepAliveTimeout = 75_000;
  server.listen(Number(env.PORT || 8000), env.HOST || "127.0.0.1");
  const stop = () => server.close(() => pool.end().then(() => process.exit(0)));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(`grammy bench bot: ${err.message}`);
  process.exit(1);
});
