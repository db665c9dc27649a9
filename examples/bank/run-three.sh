#!/usr/bin/env bash
# A broker and three bank replicas; commands go to any of them, and they agree.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p lockstep-cli -p lockstep-example-bank
rm -rf ./bank-state ./bank-demo-data
./target/release/lockstep serve --data ./bank-demo-data & BROKER=$!
trap 'kill $BROKER $R1 $R2 $R3 2>/dev/null' EXIT
sleep 1
./target/release/bank bank-1 8081 & R1=$!
./target/release/bank bank-2 8082 & R2=$!
./target/release/bank bank-3 8083 & R3=$!
sleep 1
j='content-type: application/json'
curl -s -XPOST localhost:8081/accounts/ann -H "$j" -d '{"owner":"Ann"}'; echo
curl -s -XPOST localhost:8082/accounts/ann/deposit -H "$j" -d '{"amount":100}'; echo
curl -s -XPOST localhost:8083/accounts/bob -H "$j" -d '{"owner":"Bob"}'; echo
curl -s -XPOST localhost:8081/accounts/ann/transfer -H "$j" -d '{"to":"bob","amount":30}'; echo
curl -s -XPOST localhost:8083/accounts/ann/withdraw -H "$j" -d '{"amount":500}'; echo   # refused
sleep 0.5
for port in 8081 8082 8083; do
  echo "replica on $port: $(curl -s localhost:$port/accounts/ann) $(curl -s localhost:$port/accounts/bob)"
done
./target/release/lockstep subs
