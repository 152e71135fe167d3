from meshagent.cli import main

main()
